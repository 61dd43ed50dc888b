// The broker URL the tests, the preflight and the benchmark use: AMQP_URL when set, else
// the service's own default accounts on localhost (src/amqp/defaults.ts), the first that
// the broker accepts. So a fresh clone's `npm test` runs against a stock local RabbitMQ
// (only guest) as it does against one with testuser (compose, .ci/run).
import amqp from 'amqplib';
import { DEFAULT_URLS } from '../../src/amqp/defaults.ts';

/** Whether the broker refused the login (as opposed to not answering). */
function refused(err: unknown): boolean {
  return /ACCESS.REFUSED|\b403\b/.test(String((err as Error | undefined)?.message));
}

/**
 * The first of `urls` whose login the broker accepts. A broker that does not answer at
 * all decides nothing: the first URL is returned, and whoever uses it says what is wrong.
 */
export async function firstAccepted(urls: readonly string[], timeoutMs = 3_000): Promise<string> {
  for (const url of urls) {
    try {
      const connection = await amqp.connect(url, { timeout: timeoutMs });
      await connection.close().catch(() => {});
      return url;
    } catch (err) {
      if (!refused(err)) break;
    }
  }
  return urls[0] as string;
}

/** AMQP_URL, or the default account this broker accepts. */
export async function testBrokerUrl(): Promise<string> {
  return process.env.AMQP_URL || (await firstAccepted(DEFAULT_URLS));
}

/** The `user:password@` of a URL, to check that it never shows in output. */
export function credentialsOf(url: string): string {
  const parsed = new URL(url);
  return `${parsed.username}:${parsed.password}@`;
}
