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
// - A publish that can never succeed is not tried again (PublishRefusedError): one that
//   amqplib cannot encode (a header table over 64 KB, a table that looks like amqplib's
//   typed-value escape) throws at once, and one the broker refuses with a 406 closes the
//   channel. A 406 fails every publish waiting on that channel, so it is blamed on a
//   publish only when that publish meets a second one; the others go through on the
//   next channel. The caller then publishes a cleaned copy (dispatch/outcome.ts).
//
// The publish budget is wall-clock time from the first try, backoff included; only time
// the broker spends blocking the connection (an alarm) is not counted.
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import type { Logger } from 'pino';
import { PublishRefusedError, UnroutableError } from '../errors.ts';
import { backoffDelay } from '../util/backoff.ts';
import {
  AddressList,
  type BrokerConnection,
  isLoginRefused,
  isRefusedAsClosing,
  openConnection,
} from './connection.ts';
import { declareTopology, type Topology } from './topology.ts';
import { writeTogetherThisTurn } from './turn-writes.ts';

export interface PublisherOptions {
  urls: readonly string[];
  /** The list to take them from, when shared with the consumer (an account list; see connection.ts). */
  addresses?: AddressList;
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
  /** The broker closed the channel with a 406: the publishes that were waiting on it were refused. */
  refused: Error | undefined;
  /** Publishes waiting for their confirm, in publish order. */
  pending: Pending[];
  watchdog: NodeJS.Timeout | undefined;
  /** When a confirm last came, or the wait for one began (performance.now()). */
  progressAt: number;
}

type PublisherEvents = { unroutable: [] };

/** One publish's tries so far: when the first began, time blocked meanwhile, refusals met. */
interface Tries {
  readonly startedAt: number;
  blocked: number;
  refusals: number;
}

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
    this.#addresses = opts.addresses ?? new AddressList(opts.urls);
    this.#log = opts.logger.child({ component: 'publisher' });
    this.#timeoutMs = opts.publishTimeoutMs ?? 60_000;
  }

  /** True while the broker has blocked our publishing connection (a memory or disk alarm). */
  get blocked(): boolean {
    return this.#live?.connection.blocked ?? false;
  }

  /**
   * Publishes and resolves once the broker has confirmed; retries across reconnects. With a
   * live session, the first try goes out at once, without an async frame: this runs once
   * per reply, and the frames of the retry loop were an allocation per task for a loop
   * that nearly always ends at its first try.
   */
  publish(exchange: string, routingKey: string, content: Buffer, options: Options.Publish): Promise<void> {
    const tries: Tries = { startedAt: performance.now(), blocked: 0, refusals: 0 };
    const live = this.#live;
    if (live === undefined || this.#closed)
      return this.#publishTrying(exchange, routingKey, content, options, tries, 1);
    const blockedAtStart = live.connection.blockedMs;
    return this.#publishOnce(live, exchange, routingKey, content, options).catch(async (err: unknown) => {
      await sleep(this.#afterFailedTry(err, live, blockedAtStart, tries, 1));
      return this.#publishTrying(exchange, routingKey, content, options, tries, 2);
    });
  }

  /** Tries from `first` on, each on the session open at the time, until one is confirmed or it is final. */
  async #publishTrying(
    exchange: string,
    routingKey: string,
    content: Buffer,
    options: Options.Publish,
    tries: Tries,
    first: number,
  ): Promise<void> {
    for (let attempt = first; ; attempt++) {
      if (this.#closed) throw new Error('the publisher is closed');
      let session: Session | undefined;
      let blockedAtStart = 0;
      try {
        session = await this.#open();
        blockedAtStart = session.connection.blockedMs;
        await this.#publishOnce(session, exchange, routingKey, content, options);
        return;
      } catch (err) {
        await sleep(this.#afterFailedTry(err, session, blockedAtStart, tries, attempt));
      }
    }
  }

  /**
   * After a failed try: throws when it was the last (a publish that can never succeed, or
   * the budget spent), else says how long to wait before the next. Time the broker blocked
   * the connection during the try is not counted against the budget.
   */
  #afterFailedTry(
    err: unknown,
    session: Session | undefined,
    blockedAtStart: number,
    tries: Tries,
    attempt: number,
  ): number {
    if (err instanceof UnroutableError || err instanceof PublishRefusedError) throw err;
    if (session !== undefined) tries.blocked += session.connection.blockedMs - blockedAtStart;
    // A try refused unwritten (the channel was closing after the refusal) is not a second refusal.
    const unwritten = isRefusedAsClosing(err);
    if (session?.refused !== undefined && !unwritten && ++tries.refusals >= 2)
      throw new PublishRefusedError(`the broker refused it twice: ${session.refused.message}`, {
        cause: session.refused,
      });
    const delay = backoffDelay(attempt, { initialMs: 100, maxMs: 5_000 });
    if (performance.now() - tries.startedAt - tries.blocked + delay >= this.#timeoutMs || this.#closed)
      throw err;
    this.#log.warn({ err, attempt }, 'publish failed; trying again');
    return delay;
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
      // The first publish after a quiet spell starts the wait: the last confirm may be old.
      if (session.pending.length === 0) session.progressAt = performance.now();
      session.pending.push(entry);
      const confirmed = (err: unknown) => {
        const at = session.pending.indexOf(entry);
        if (at !== -1) session.pending.splice(at, 1);
        // Any confirm is progress: the connection is alive. A stamp, not a new timer:
        // this runs once per publish.
        session.progressAt = performance.now();
        if (err) reject(err instanceof Error ? err : new Error('the broker did not confirm the publish'));
        else if (entry.returned !== undefined) {
          this.emit('unroutable');
          void this.#redeclare();
          reject(new UnroutableError(exchange, routingKey, entry.returned));
        } else resolve();
      };
      try {
        session.channel.publish(exchange, routingKey, content, options, confirmed);
      } catch (err) {
        session.pending.splice(session.pending.indexOf(entry), 1);
        // Not written because the channel or its connection has begun to close: a try
        // that failed for now, like a lost connection (the next one goes on a new one).
        if (isRefusedAsClosing(err)) reject(err);
        // Not even written: amqplib could not encode it. It never will; nothing waits.
        else
          reject(new PublishRefusedError(`it cannot be encoded: ${(err as Error).message}`, { cause: err }));
        return;
      }
      // The replies and dead letters of one read of results leave in one write.
      writeTogetherThisTurn(session.channel);
      this.#watch(session);
    });
  }

  /**
   * The session's watchdog: while publishes wait for confirms and the connection is not
   * blocked, some confirm must come within the connect timeout, or the connection is
   * half-open: it is destroyed, which fails every confirm waiting on it, and each publish
   * goes again on a new one. One timer per connection, armed while publishes wait; a
   * confirm only stamps `progressAt`, and the timer, when it fires, sleeps again until
   * the connect timeout after the last progress. So a slow but moving broker (a long
   * backlog, a slow disk) is never taken for a dead one, and no confirm touches a timer.
   * `restart`: the wait begins now (the connection was unblocked: time blocked is not
   * counted).
   */
  #watch(session: Session, restart = false): void {
    const { connection } = session;
    if (restart) session.progressAt = performance.now();
    if (session.pending.length === 0 || connection.blocked) {
      clearTimeout(session.watchdog);
      session.watchdog = undefined;
      return;
    }
    if (session.watchdog !== undefined) return;
    const timeoutMs = this.#opts.connectTimeoutMs;
    const check = () => {
      session.watchdog = undefined;
      if (session.pending.length === 0 || connection.blocked) return;
      const quietMs = performance.now() - session.progressAt;
      if (quietMs < timeoutMs) {
        session.watchdog = setTimeout(check, timeoutMs - quietMs);
        return;
      }
      this.#log.warn('no publish confirm within the connect timeout: dropping the publishing connection');
      connection.destroy('publish confirms overdue');
    };
    session.watchdog = setTimeout(check, Math.max(0, session.progressAt + timeoutMs - performance.now()));
  }

  #open(): Promise<Session> {
    this.#session ??= this.#connect().catch((err) => {
      this.#session = undefined;
      throw err;
    });
    return this.#session;
  }

  async #connect(): Promise<Session> {
    const url = this.#addresses.next();
    const connection = await openConnection(
      url,
      { purpose: 'publish', connectTimeoutMs: this.#opts.connectTimeoutMs, logger: this.#log },
      this.#stop.signal,
    ).catch((err: unknown) => {
      if (isLoginRefused(err)) this.#addresses.refused(url);
      throw err;
    });
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
      const session: Session = {
        connection,
        channel,
        refused: undefined,
        pending: [],
        watchdog: undefined,
        progressAt: performance.now(),
      };
      connection.on('blocked', () => this.#watch(session));
      connection.on('unblocked', () => this.#watch(session, true));
      connection.once('closed', () => clearTimeout(session.watchdog));
      channel.on('error', (err: Error & { code?: unknown }) => {
        if (err.code === 406) session.refused = err;
        this.#log.warn({ err }, 'publishing channel error');
      });
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

  /**
   * Declares the topology now (on the publishing connection, opened if need be): what it
   * has gained since the connection declared it (a delay queue) exists before it is used.
   */
  async declare(): Promise<void> {
    await this.#open();
    await this.#redeclare('declared the topology again for a new delay queue', true);
  }

  /** Declares the topology again, on a channel of its own (a clash must not close the publishing one). */
  async #redeclare(
    saying = 'declared the topology again after an unroutable message',
    rethrow = false,
  ): Promise<void> {
    const topology = this.#opts.topology;
    const session = this.#live;
    if (topology === undefined || session === undefined) return;
    const { connection } = session;
    try {
      const channel = await connection.step('opening a channel to declare', () =>
        connection.model.createChannel(),
      );
      channel.on('error', () => {});
      await connection.step('declaring the topology again', () =>
        declareTopology(channel, topology, {
          version: connection.serverVersion,
          openChannel: () => connection.model.createChannel(),
        }),
      );
      await channel.close().catch(() => {});
      this.#log.info(saying);
    } catch (err) {
      this.#log.warn({ err }, 'declaring the topology again failed');
      if (rethrow) throw err;
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#stop.abort(new Error('connecting was abandoned: the service is stopping'));
    const session = this.#live;
    this.#live = undefined;
    this.#session = undefined;
    // A blocked connection does not read our close: end it at once.
    if (session?.connection.blocked) session.connection.destroy('closing while blocked');
    else await session?.connection.close();
  }
}
