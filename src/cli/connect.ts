// How a subcommand that talks to the broker connects: the service's own URL rules (none
// given: the default accounts on localhost, in order), one deadline, and one line that
// says where it could not connect.
import pino from 'pino';
import { AddressList, type BrokerConnection, openFirst } from '../amqp/connection.ts';
import { DEFAULT_URLS } from '../amqp/defaults.ts';
import { redactUrl, splitUrls } from '../amqp/url.ts';

export async function connectCommand(url: string | undefined): Promise<BrokerConnection> {
  const addresses = url === undefined ? AddressList.accounts(DEFAULT_URLS) : new AddressList(splitUrls(url));
  return openFirst(addresses, {
    purpose: 'client',
    connectTimeoutMs: 10_000,
    logger: pino({ level: 'silent' }),
  }).catch((err: unknown) => {
    const where = url === undefined ? DEFAULT_URLS.map(redactUrl).join(' or ') : redactUrl(url);
    throw new Error(`cannot connect to ${where}: ${(err as Error).message}`, { cause: err });
  });
}
