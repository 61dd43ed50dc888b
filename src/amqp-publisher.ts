// Publishing (dead letters, replies, retries) on a connection of its own, through a
// confirm channel. Its own connection because a memory alarm blocks publishing
// connections (connection.blocked), and that must never stop the acks on the consuming
// connection. A publish resolves only when the broker has confirmed it; a lost connection
// is reopened and the publish tried again until its deadline.
import amqp, { type ChannelModel, type ConfirmChannel, type Options } from 'amqplib';
import type { Logger } from 'pino';
import { socketOptions, withHeartbeat } from './amqp-url.ts';
import { backoffDelay } from './backoff.ts';

export interface PublisherOptions {
  url: string;
  logger: Logger;
  /** How long one publish may keep retrying across reconnects before it fails. */
  publishTimeoutMs?: number;
}

export class AmqpPublisher {
  readonly #url: string;
  readonly #log: Logger;
  readonly #timeoutMs: number;
  #connection: ChannelModel | undefined;
  #channel: Promise<ConfirmChannel> | undefined;
  #blocked = false;
  #closed = false;

  constructor(opts: PublisherOptions) {
    this.#url = withHeartbeat(opts.url);
    this.#log = opts.logger.child({ component: 'publisher' });
    this.#timeoutMs = opts.publishTimeoutMs ?? 60_000;
  }

  /** True while the broker has blocked our publishing connection (a memory or disk alarm). */
  get blocked(): boolean {
    return this.#blocked;
  }

  /** Publishes and resolves once the broker has confirmed; retries across reconnects. */
  async publish(
    exchange: string,
    routingKey: string,
    content: Buffer,
    options: Options.Publish,
  ): Promise<void> {
    const deadline = performance.now() + this.#timeoutMs;
    for (let attempt = 1; ; attempt++) {
      if (this.#closed) throw new Error('the publisher is closed');
      try {
        const channel = await this.#open();
        await new Promise<void>((resolve, reject) => {
          channel.publish(exchange, routingKey, content, options, (err) =>
            err
              ? reject(err instanceof Error ? err : new Error('the broker did not confirm the publish'))
              : resolve(),
          );
        });
        return;
      } catch (err) {
        if (performance.now() >= deadline || this.#closed) throw err;
        this.#log.warn({ err, attempt }, 'publish failed; trying again');
        await new Promise((r) => setTimeout(r, backoffDelay(attempt, { initialMs: 100, maxMs: 5_000 })));
      }
    }
  }

  #open(): Promise<ConfirmChannel> {
    this.#channel ??= this.#connect().catch((err) => {
      this.#channel = undefined;
      throw err;
    });
    return this.#channel;
  }

  async #connect(): Promise<ConfirmChannel> {
    const connection = await amqp.connect(this.#url, socketOptions('publish'));
    this.#connection = connection;
    const forget = () => {
      if (this.#connection === connection) {
        this.#connection = undefined;
        this.#channel = undefined;
        this.#blocked = false;
      }
    };
    connection.on('error', (err) => this.#log.warn({ err }, 'publishing connection error'));
    connection.on('close', forget);
    connection.on('blocked', (reason) => {
      this.#blocked = true;
      this.#log.warn({ reason }, 'the broker blocked publishing (resource alarm)');
    });
    connection.on('unblocked', () => {
      this.#blocked = false;
      this.#log.info('the broker unblocked publishing');
    });
    const channel = await connection.createConfirmChannel();
    channel.on('error', (err) => this.#log.warn({ err }, 'publishing channel error'));
    channel.on('close', () => {
      // A channel closed by an error (say, publishing to a missing exchange) while the
      // connection lives on: drop the connection too, so the next publish starts clean.
      if (this.#connection === connection) {
        forget();
        connection.close().catch(() => {});
      }
    });
    return channel;
  }

  async close(): Promise<void> {
    this.#closed = true;
    const connection = this.#connection;
    this.#connection = undefined;
    this.#channel = undefined;
    if (connection !== undefined) await connection.close().catch(() => {});
  }
}
