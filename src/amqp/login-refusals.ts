// What the consumer says when the broker refuses its login, and when. With an account
// list the next account is tried at once, with a line of news; once every address has
// been refused, one error line says what to do, and the retries after it (with backoff,
// in case the user is created meanwhile) say nothing more. A session that starts
// consuming starts the count again.
import type { Logger } from 'pino';
import { type AddressList, userOf } from './connection.ts';
import { redactUrl } from './url.ts';

export class LoginRefusals {
  readonly #addresses: AddressList;
  readonly #log: Logger;
  /** Logins refused in a row. */
  #count = 0;

  constructor(addresses: AddressList, log: Logger) {
    this.#addresses = addresses;
    this.#log = log;
  }

  /** The broker refused the login of `url`. */
  refused(url: string, err: unknown): void {
    this.#addresses.refused(url);
    this.#count++;
    const size = this.#addresses.size;
    if (this.#count < size) {
      this.#log.info(
        { broker: redactUrl(url) },
        `the broker refused the login of ${userOf(url)}; trying the next`,
      );
      return;
    }
    if (this.#count > size) {
      this.#log.debug({ err, broker: redactUrl(url) }, 'login refused again');
      return;
    }
    const message = this.#addresses.isAccounts
      ? `RabbitMQ refused every default login (${this.#addresses.all.map(userOf).join(', then ')}): give --amqp-url (AMQP_URL) with a user it has, or create testuser (npm run setup:broker); retrying quietly`
      : `RabbitMQ refused the login of ${userOf(url)}${size > 1 ? ' on every address' : ''}: check the user and password in --amqp-url (AMQP_URL); retrying quietly`;
    this.#log.error({ broker: redactUrl(url), err }, message);
  }

  /** A session is consuming: its login worked. */
  accepted(): void {
    this.#count = 0;
  }
}
