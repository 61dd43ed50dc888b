// Publishing (dead letters, replies, retries) on a connection of its own, through a
// confirm channel. Its own connection because a memory alarm blocks publishing
// connections (connection.blocked), and that must never stop the acks on the consuming
// connection. A publish resolves only when the broker has confirmed it:
//
// - A lost or half-open connection: the connect has deadlines (amqp-connection.ts), and
//   a confirm that does not come within the connect timeout while the connection is not
//   blocked means the connection is dead: it is destroyed, and the publish tried again on
//   a new one, until the publish deadline.
// - A blocked connection (a resource alarm): the confirm comes after the alarm clears, so
//   the publish waits for it and its deadline does not run meanwhile. Giving up would put
//   the original back while its copy is still on its way: two copies later.
// - `mandatory` and unroutable (the dead-letter or retry queue was deleted): the broker
//   returns the message and then confirms it. That is a failed publish, not a retry: the
//   caller gives the original back, and the topology is declared again for next time.
import { EventEmitter } from 'node:events';
import type { ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import type { Logger } from 'pino';
import { AddressList, type BrokerConnection, openConnection } from './amqp-connection.ts';
import { backoffDelay } from './backoff.ts';
import { declareTopology, type Topology } from './topology.ts';

export class UnroutableError extends Error {
  readonly code = 'ERR_UNROUTABLE';
  constructor(exchange: string, routingKey: string, replyText: string) {
    super(
      `the broker could not route the message to ${JSON.stringify(routingKey)} on ${exchange === '' ? 'the default exchange' : JSON.stringify(exchange)} (${replyText})`,
    );
    this.name = 'UnroutableError';
  }
}

export interface PublisherOptions {
  urls: readonly string[];
  connectTimeoutMs: number;
  logger: Logger;
  /** Declared again after an unroutable copy, so that the next one has somewhere to go. */
  topology?: Topology;
  /** How long one publish may keep retrying across reconnects (time blocked not counted). */
  publishTimeoutMs?: number;
}

/** A publish waiting for its confirm, to be matched with a basic.return. */
interface Pending {
  exchange: string;
  routingKey: string;
  content: Buffer;
  returned: string | undefined;
}

interface Session {
  connection: BrokerConnection;
  channel: ConfirmChannel;
  /** Publishes waiting for their confirm, in publish order. */
  pending: Pending[];
  watchdog: NodeJS.Timeout | undefined;
}

type PublisherEvents = { unroutable: [] };

export class AmqpPublisher extends EventEmitter<PublisherEvents> {
  readonly #opts: PublisherOptions;
  readonly #addresses: AddressList;
  readonly #log: Logger;
  readonly #timeoutMs: number;
  #session: Promise<Session> | undefined;
  #live: Session | undefined;
  #closed = false;
  /** Aborted by close(): a connect in progress is given up at once. */
  readonly #stop = new AbortController();

  constructor(opts: PublisherOptions) {
    super();
    this.#opts = opts;
    this.#addresses = new AddressList(opts.urls);
    this.#log = opts.logger.child({ component: 'publisher' });
    this.#timeoutMs = opts.publishTimeoutMs ?? 60_000;
  }

  /** True while the broker has blocked our publishing connection (a memory or disk alarm). */
  get blocked(): boolean {
    return this.#live?.connection.blocked ?? false;
  }

  /** Publishes and resolves once the broker has confirmed; retries across reconnects. */
  async publish(
    exchange: string,
    routingKey: string,
    content: Buffer,
    options: Options.Publish,
  ): Promise<void> {
    let budget = this.#timeoutMs;
    for (let attempt = 1; ; attempt++) {
      if (this.#closed) throw new Error('the publisher is closed');
      const startedAt = performance.now();
      let session: Session | undefined;
      let blockedAtStart = 0;
      try {
        session = await this.#open();
        blockedAtStart = session.connection.blockedMs;
        await this.#publishOnce(session, exchange, routingKey, content, options);
        return;
      } catch (err) {
        if (err instanceof UnroutableError) throw err;
        // Time blocked by a resource alarm does not count: the confirm comes after it.
        const blocked = session === undefined ? 0 : session.connection.blockedMs - blockedAtStart;
        budget -= performance.now() - startedAt - blocked;
        if (budget <= 0 || this.#closed) throw err;
        this.#log.warn({ err: { message: (err as Error).message }, attempt }, 'publish failed; trying again');
        await new Promise((r) => setTimeout(r, backoffDelay(attempt, { initialMs: 100, maxMs: 5_000 })));
      }
    }
  }

  /** One try on one connection: resolves once confirmed. */
  #publishOnce(
    session: Session,
    exchange: string,
    routingKey: string,
    content: Buffer,
    options: Options.Publish,
  ): Promise<void> {
    const entry: Pending = { exchange, routingKey, content, returned: undefined };
    return new Promise<void>((resolve, reject) => {
      session.pending.push(entry);
      this.#watch(session);
      session.channel.publish(exchange, routingKey, content, options, (err) => {
        const at = session.pending.indexOf(entry);
        if (at !== -1) session.pending.splice(at, 1);
        // Any confirm is progress: the connection is alive.
        this.#watch(session, true);
        if (err) reject(err instanceof Error ? err : new Error('the broker did not confirm the publish'));
        else if (entry.returned !== undefined) {
          this.emit('unroutable');
          void this.#redeclare();
          reject(new UnroutableError(exchange, routingKey, entry.returned));
        } else resolve();
      });
    });
  }

  /**
   * The session's watchdog: while publishes wait for confirms and the connection is not
   * blocked, some confirm must come within the connect timeout, or the connection is
   * half-open: it is destroyed, which fails every confirm waiting on it, and each publish
   * goes again on a new one. One timer per connection, restarted by any progress, so a
   * slow but moving broker (a long backlog, a slow disk) is never taken for a dead one.
   */
  #watch(session: Session, progress = false): void {
    const { connection } = session;
    if (progress || session.pending.length === 0 || connection.blocked) {
      clearTimeout(session.watchdog);
      session.watchdog = undefined;
    }
    if (session.pending.length === 0 || connection.blocked || session.watchdog !== undefined) return;
    session.watchdog = setTimeout(() => {
      session.watchdog = undefined;
      if (session.pending.length === 0 || connection.blocked) return;
      this.#log.warn('no publish confirm within the connect timeout: dropping the publishing connection');
      connection.destroy('publish confirms overdue');
    }, this.#opts.connectTimeoutMs);
  }

  #open(): Promise<Session> {
    this.#session ??= this.#connect().catch((err) => {
      this.#session = undefined;
      throw err;
    });
    return this.#session;
  }

  async #connect(): Promise<Session> {
    const connection = await openConnection(
      this.#addresses.next(),
      { purpose: 'publish', connectTimeoutMs: this.#opts.connectTimeoutMs, logger: this.#log },
      this.#stop.signal,
    );
    const forget = () => {
      if (this.#live?.connection === connection) {
        this.#live = undefined;
        this.#session = undefined;
      }
    };
    connection.once('closed', forget);
    try {
      const channel = await connection.step('opening the publishing channel', () =>
        connection.model.createConfirmChannel(),
      );
      const session: Session = { connection, channel, pending: [], watchdog: undefined };
      connection.on('blocked', () => this.#watch(session));
      connection.on('unblocked', () => this.#watch(session));
      connection.once('closed', () => clearTimeout(session.watchdog));
      channel.on('error', (err) =>
        this.#log.warn({ err: { message: err.message } }, 'publishing channel error'),
      );
      // A channel closed by an error (say, publishing to a missing exchange) while the
      // connection lives on: drop the connection too, so the next publish starts clean.
      channel.on('close', () => {
        forget();
        void connection.close();
      });
      channel.on('return', (message: ConsumeMessage) => this.#onReturn(session, message));
      this.#live = session;
      if (this.#closed) await connection.close();
      return session;
    } catch (err) {
      connection.destroy('could not open the publishing channel');
      throw err;
    }
  }

  /**
   * basic.return comes before the confirm of the same message, and returns come in
   * publish order: the first waiting publish with the same exchange, key and body that
   * was not returned yet is the one.
   */
  #onReturn(session: Session, message: ConsumeMessage): void {
    const { exchange, routingKey } = message.fields;
    const entry = session.pending.find(
      (p) =>
        p.returned === undefined &&
        p.exchange === exchange &&
        p.routingKey === routingKey &&
        p.content.equals(message.content),
    );
    const replyText = (message.fields as { replyText?: string }).replyText ?? 'NO_ROUTE';
    if (entry !== undefined) entry.returned = replyText;
    this.#log.error({ exchange, routingKey, replyText }, 'the broker returned an unroutable message');
  }

  /** Declares the topology again, on a channel of its own (a clash must not close the publishing one). */
  async #redeclare(): Promise<void> {
    const topology = this.#opts.topology;
    const session = this.#live;
    if (topology === undefined || session === undefined) return;
    const { connection } = session;
    try {
      const channel = await connection.step('opening a channel to declare', () =>
        connection.model.createChannel(),
      );
      channel.on('error', () => {});
      await connection.step('declaring the topology again', () => declareTopology(channel, topology));
      await channel.close().catch(() => {});
      this.#log.info('declared the topology again after an unroutable message');
    } catch (err) {
      this.#log.warn({ err: { message: (err as Error).message } }, 'declaring the topology again failed');
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#stop.abort();
    const session = this.#live;
    this.#live = undefined;
    this.#session = undefined;
    // A blocked connection does not read our close: end it at once.
    if (session?.connection.blocked) session.connection.destroy('closing while blocked');
    else await session?.connection.close();
  }
}
