// One broker connection's lifecycle, shared by the consuming and the publishing side:
// connect with a deadline on every step, know when the broker blocks it (a resource
// alarm), and forget it once it closes. After rabbitmq-client's Connection and the Java
// client's connectionTimeout/handshakeTimeout: a socket that connects but never speaks
// (a partition, a dead load balancer, a stuck NAT) is destroyed at the deadline, never
// waited on. amqplib has no handshake deadline of its own: its `timeout` socket option
// is an idle timeout (it fires while the peer says nothing, which covers a silent
// handshake), and a race with our own timer covers a peer that trickles.
import { EventEmitter } from 'node:events';
import amqp, { type ChannelModel } from 'amqplib';
import type { Logger } from 'pino';
import { DeadlineError } from '../errors.ts';
import { withDeadline } from '../util/deadline.ts';
import { redactUrl, socketOptions, withHeartbeat } from './url.ts';

/**
 * The broker addresses to try. Two kinds of list:
 *
 * - nodes (a --amqp-url list): in a shuffled order, each attempt moving on to the next:
 *   losing the node we were connected to costs one reconnect, not a wait for that node,
 *   and a fleet of instances spreads over the nodes instead of all picking the first;
 * - accounts (no --amqp-url given: see defaults.ts): one broker, logins tried in the
 *   order given; the one that works is kept, and only a refused login moves on.
 */
export class AddressList {
  readonly #urls: string[];
  readonly #accounts: boolean;
  #next = 0;

  constructor(urls: readonly string[], random: () => number = Math.random, accounts = false) {
    if (urls.length === 0) throw new RangeError('at least one broker URL is needed');
    this.#urls = [...urls];
    this.#accounts = accounts;
    if (accounts) return;
    for (let i = this.#urls.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [this.#urls[i], this.#urls[j]] = [this.#urls[j] as string, this.#urls[i] as string];
    }
  }

  /** Logins to one broker, tried in this order (see the class comment). */
  static accounts(urls: readonly string[]): AddressList {
    return new AddressList(urls, Math.random, true);
  }

  get size(): number {
    return this.#urls.length;
  }

  /** Every address, in the order tried. */
  get all(): readonly string[] {
    return this.#urls;
  }

  /** Whether these are logins to one broker rather than nodes. */
  get isAccounts(): boolean {
    return this.#accounts;
  }

  /** The address to try now. Nodes: the next call gives the one after it. Accounts: the same, until refused. */
  next(): string {
    const url = this.#urls[this.#next % this.#urls.length] as string;
    if (!this.#accounts) this.#next = (this.#next + 1) % this.#urls.length;
    return url;
  }

  /** The broker refused the login of `url`: an account list moves on to the next one. */
  refused(url: string): void {
    if (this.#accounts && this.#urls[this.#next] === url) this.#next = (this.#next + 1) % this.#urls.length;
  }
}

/** Whether an error is the broker refusing the login (wrong user or password: 403 ACCESS_REFUSED). */
export function isLoginRefused(err: unknown): boolean {
  const message = (err as { message?: unknown } | undefined)?.message;
  return typeof message === 'string' && /ACCESS.REFUSED|\b403\b/.test(message);
}

/**
 * Whether amqplib refused a write (an ack, a nack, a publish) because its channel or its
 * connection has begun to close: it throws its IllegalOperationError at once, and the
 * write never reached the socket.
 */
export function isRefusedAsClosing(err: unknown): boolean {
  return (err as { name?: unknown } | undefined)?.name === 'IllegalOperationError';
}

/** The user of a broker URL, for a log line that must not show the password. */
export function userOf(url: string): string {
  try {
    return decodeURIComponent(new URL(url).username) || 'guest';
  } catch {
    return '(unreadable URL)';
  }
}

export interface ConnectOptions {
  purpose: 'consume' | 'publish' | 'client';
  /** The deadline of each step: TCP connect plus AMQP handshake, then each step() after it. */
  connectTimeoutMs: number;
  logger: Logger;
}

type ConnectionEvents = {
  /** The connection has gone, for whatever reason; emitted once. */
  closed: [reason: string];
  blocked: [reason: string];
  unblocked: [];
};

/** An open connection, its deadlines, whether it is blocked, and its end. */
export class BrokerConnection extends EventEmitter<ConnectionEvents> {
  readonly model: ChannelModel;
  /** The broker address, without its password: for logs and /health. */
  readonly address: string;
  readonly #timeoutMs: number;
  readonly #log: Logger;
  #blocked = false;
  #closed = false;
  #closing: Promise<void> | undefined;
  /** Time spent blocked by the broker, for deadlines that must not count it. */
  #blockedBefore = 0;
  #blockedSince: number | undefined;

  constructor(model: ChannelModel, address: string, opts: ConnectOptions) {
    super();
    this.model = model;
    this.address = address;
    this.#timeoutMs = opts.connectTimeoutMs;
    this.#log = opts.logger;
    model.on('error', (err: Error) => this.#log.warn({ err, broker: address }, 'connection error'));
    model.on('close', () => this.#end('connection closed'));
    model.on('blocked', (reason: string) => {
      this.#blocked = true;
      this.#blockedSince ??= performance.now();
      this.#log.warn({ reason, purpose: opts.purpose }, 'the broker blocked the connection (resource alarm)');
      this.emit('blocked', reason);
    });
    model.on('unblocked', () => {
      this.#blocked = false;
      if (this.#blockedSince !== undefined) this.#blockedBefore += performance.now() - this.#blockedSince;
      this.#blockedSince = undefined;
      this.#log.info({ purpose: opts.purpose }, 'the broker unblocked the connection');
      this.emit('unblocked');
    });
  }

  /** The broker's version, as it says in connection.start. */
  get serverVersion(): string | undefined {
    const props = (this.model.connection as unknown as { serverProperties?: { version?: unknown } })
      .serverProperties;
    return typeof props?.version === 'string' ? props.version : undefined;
  }

  /** True while the broker has blocked this connection (a memory or disk alarm). */
  get blocked(): boolean {
    return this.#blocked;
  }

  /** All the time this connection has spent blocked so far, the current stretch included. */
  get blockedMs(): number {
    return (
      this.#blockedBefore + (this.#blockedSince === undefined ? 0 : performance.now() - this.#blockedSince)
    );
  }

  get isClosed(): boolean {
    return this.#closed;
  }

  /**
   * Runs one step of getting the session up (channel open, declarations, consume) with
   * the connect deadline; past it the whole connection is destroyed, socket and all.
   */
  step<T>(what: string, run: () => Promise<T>): Promise<T> {
    const late = new DeadlineError(what, this.#timeoutMs);
    return withDeadline(run(), this.#timeoutMs, {
      late: () => late,
      onGiveUp: () => this.destroy(late.message),
    });
  }

  /** Ends the connection at once, without the closing handshake: for a peer that does not answer. */
  destroy(reason: string): void {
    if (this.#closed) return;
    const stream = (
      this.model.connection as unknown as { stream?: NodeJS.ReadWriteStream & { destroy(err?: Error): void } }
    ).stream;
    // With an error, so that amqplib sees the socket go (it listens for 'error' and 'end').
    stream?.destroy(new Error(reason));
    this.#end(reason);
  }

  /**
   * The closing handshake, bounded by the deadline; past it the socket is destroyed.
   * Idempotent: a second call (the channel's close handler and the owner's close) joins
   * the first instead of starting a second handshake that amqplib refuses.
   */
  close(): Promise<void> {
    this.#closing ??= this.#closed
      ? Promise.resolve()
      : this.step('closing the connection', () => this.model.close())
          .catch(() => this.destroy('the close handshake did not finish'))
          .then(() => this.#end('closed by us'));
    return this.#closing;
  }

  #end(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#blocked = false;
    this.emit('closed', reason);
  }
}

/**
 * Opens a connection to the first of `addresses` that answers, trying each once in the
 * list's order: for one-shot users (the client, `publish`) that do not reconnect.
 */
export async function openFirst(addresses: AddressList, opts: ConnectOptions): Promise<BrokerConnection> {
  let last: unknown;
  for (const url of addresses.all) {
    try {
      return await openConnection(url, opts);
    } catch (err) {
      last = err;
    }
  }
  throw last;
}

/**
 * Opens a connection to `url` (TCP connect and AMQP handshake) within the connect
 * deadline; `signal` gives up at once (a drain must not wait for a connect that hangs).
 */
export async function openConnection(
  url: string,
  opts: ConnectOptions,
  signal?: AbortSignal,
): Promise<BrokerConnection> {
  const address = redactUrl(url);
  const connecting = amqp.connect(withHeartbeat(url), {
    ...socketOptions(opts.purpose),
    // amqplib's idle timeout while connecting: a peer that says nothing is destroyed.
    timeout: opts.connectTimeoutMs,
  });
  let late = false;
  // A handshake that completes after we gave up must not leave a connection behind.
  connecting.then(
    (model) => {
      if (late) model.close().catch(() => {});
    },
    () => {},
  );
  const model = await withDeadline(connecting, opts.connectTimeoutMs, {
    late: () => new DeadlineError(`connecting to ${address}`, opts.connectTimeoutMs),
    ...(signal === undefined ? {} : { signal }),
    onGiveUp: () => {
      late = true;
    },
  });
  return new BrokerConnection(model, address, opts);
}
