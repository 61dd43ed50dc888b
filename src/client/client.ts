// The producer side: send a task (confirmed by the broker) or call one and await its
// result through RabbitMQ's direct reply-to. Types flow from the task module:
//
//   import type * as tasks from '../tasks/index.ts';
//   const client = await createClient<typeof tasks>();
//   const sum = await client.call('test', [1, 2]);   // number; a wrong argument is a compile error
//
// One connection and one confirm channel per client. Messages are published persistent
// and mandatory, so a message that no queue would take is an error, not a silent drop.
// sendMany publishes a batch down the same channel without waiting for each confirm in
// turn: up to a window of messages are out unconfirmed at once (and none while the
// socket's buffer is full), which is where a producer's throughput comes from.
// A lost connection is not reopened: everything pending rejects with ERR_CLIENT_CLOSED
// and the caller makes a new client.
import { randomUUID } from 'node:crypto';
import { context, propagation } from '@opentelemetry/api';
import type { ChannelModel, ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import pino from 'pino';
import { AddressList, isRefusedAsClosing, openFirst } from '../amqp/connection.ts';
import { BROKER_DEFAULTS, DEFAULT_URLS } from '../amqp/defaults.ts';
import { writeTogetherThisTurn } from '../amqp/turn-writes.ts';
import { splitUrls } from '../amqp/url.ts';
import { ClientError, type FailureKind, SendManyError, TaskCallError } from '../errors.ts';
import type {
  AnyTasks,
  CallOptions,
  ClientOptions,
  SendManyOptions,
  SendOptions,
  TaskArgs,
  TaskItem,
  TaskModule,
  TaskName,
  TaskResult,
} from './types.ts';

const DEFAULT_WINDOW = 1_000;

/** A message ready to publish: its id, body and properties. */
interface Outgoing {
  messageId: string;
  content: Buffer;
  properties: Options.Publish;
}

const REPLY_TO = 'amq.rabbitmq.reply-to';
const KINDS: readonly string[] = ['failed', 'timeout', 'crashed', 'rejected', 'cancelled'];

type Settle = (err: Error | undefined, result?: unknown) => void;

export class Client<T extends TaskModule = AnyTasks> {
  readonly exchange: string;
  readonly routingKey: string;
  readonly #connection: ChannelModel;
  readonly #channel: ConfirmChannel;
  /** Calls waiting for their reply, by correlation id. */
  readonly #pending = new Map<string, Settle>();
  /**
   * Message ids the broker returned as unroutable, counted (a batch may repeat an id);
   * the confirm of each follows its return.
   */
  readonly #returned = new Map<string, number>();
  /** sendMany calls waiting for the channel's buffer to drain (or for it to close). */
  readonly #drainWaiters = new Set<() => void>();
  #replies: Promise<unknown> | undefined;
  /** Set once the client can no longer publish: why. */
  #closed: ClientError | undefined;
  /** The last error the broker gave for the channel or connection (say, a missing exchange). */
  #lastError: Error | undefined;

  constructor(connection: ChannelModel, channel: ConfirmChannel, exchange: string, routingKey: string) {
    this.#connection = connection;
    this.#channel = channel;
    this.exchange = exchange;
    this.routingKey = routingKey;
    const remember = (err: Error) => {
      this.#lastError = err;
    };
    connection.on('error', remember);
    channel.on('error', remember);
    const lost = (what: string) => () => {
      const why = this.#lastError === undefined ? '' : `: ${this.#lastError.message}`;
      this.#shut(new ClientError('ERR_CLIENT_CLOSED', `the ${what} to the broker closed${why}`));
    };
    connection.on('close', lost('connection'));
    channel.on('close', lost('channel'));
    // One listener for every sendMany waiting: a close wakes them too, since a buffer
    // that never drains must not hold a batch forever.
    const wakeDrainWaiters = () => {
      for (const wake of [...this.#drainWaiters]) wake();
    };
    channel.on('drain', wakeDrainWaiters);
    channel.on('close', wakeDrainWaiters);
    channel.on('return', (m: ConsumeMessage) => {
      const id = m.properties.messageId;
      if (typeof id === 'string') this.#returned.set(id, (this.#returned.get(id) ?? 0) + 1);
    });
  }

  /** Publishes the task and resolves with its message id once the broker has confirmed it. */
  async send<K extends TaskName<T>>(
    func: K,
    args: TaskArgs<T, K>,
    kwargs?: Record<string, unknown>,
    options: SendOptions = {},
  ): Promise<string> {
    const message = this.#message(func, args, kwargs, options);
    await new Promise<void>((resolve, reject) => {
      this.#publish(message, (err) => (err === undefined ? resolve() : reject(err)));
    });
    return message.messageId;
  }

  /**
   * Publishes the tasks in their order and resolves with their message ids, in the same
   * order, once the broker has confirmed every one. Every task's options are checked
   * before the first is sent: a bad one throws and sends nothing. When the broker refuses
   * one (or the connection goes), nothing more is sent; once the messages already out are
   * answered, it rejects with a SendManyError that says which were confirmed.
   */
  async sendMany(tasks: readonly TaskItem<T>[], options: SendManyOptions = {}): Promise<string[]> {
    if (this.#closed !== undefined) throw this.#closed;
    const window = options.window ?? DEFAULT_WINDOW;
    if (!Number.isSafeInteger(window) || window < 1)
      throw new RangeError(`window must be a whole number of 1 or more (got ${window})`);
    const messages = tasks.map((task) =>
      this.#message(task.func, task.args, task.kwargs, task.options ?? {}),
    );
    const confirmed = messages.map(() => false);
    let failure: ClientError | undefined;
    let unconfirmed = 0;
    /** The channel's buffer is full: nothing more until it drains. */
    let full = false;
    /** Set while the loop waits: for a confirm (a place in the window) or for the buffer to drain. */
    let wake: (() => void) | undefined;
    const wait = () =>
      new Promise<void>((resolve) => {
        wake = resolve;
      });
    const wakeUp = () => {
      const resolve = wake;
      wake = undefined;
      resolve?.();
    };
    // Woken when the channel's buffer has room again, or when it closes (the next publish
    // then fails at once, and the batch ends).
    const drained = () => {
      full = false;
      wakeUp();
    };
    this.#drainWaiters.add(drained);
    try {
      for (let i = 0; i < messages.length; i++) {
        while ((unconfirmed >= window || full) && failure === undefined) await wait();
        if (failure !== undefined) break;
        unconfirmed++;
        full = !this.#publish(messages[i] as Outgoing, (err) => {
          unconfirmed--;
          if (err === undefined) confirmed[i] = true;
          else failure ??= err;
          wakeUp();
        });
      }
      while (unconfirmed > 0) await wait();
    } finally {
      this.#drainWaiters.delete(drained);
    }
    const messageIds = messages.map((m) => m.messageId);
    if (failure !== undefined) throw new SendManyError(failure, messageIds, confirmed);
    return messageIds;
  }

  /** The message for a task: send's checks, its id, its body and its properties. */
  #message(
    func: string,
    args: unknown,
    kwargs: Record<string, unknown> | undefined,
    options: SendOptions,
  ): Outgoing {
    const messageId = options.messageId ?? randomUUID();
    // AMQP's short string: amqplib would throw while sending, after the batch has begun.
    if (typeof messageId !== 'string' || Buffer.byteLength(messageId) > 255)
      throw new RangeError('messageId must be a string of at most 255 bytes');
    const body = JSON.stringify(kwargs === undefined ? { func, args } : { func, args, kwargs });
    const properties: Options.Publish = {
      persistent: true,
      mandatory: true,
      contentType: 'application/json',
      messageId,
    };
    if (options.replyTo !== undefined) properties.replyTo = options.replyTo;
    if (options.correlationId !== undefined) properties.correlationId = options.correlationId;
    if (options.headers !== undefined) properties.headers = options.headers;
    // The caller's active trace, when its OpenTelemetry SDK registered a propagator (the
    // API's default one writes nothing): the task's span becomes its child.
    const carrier: Record<string, string> = {};
    propagation.inject(context.active(), carrier);
    if (carrier.traceparent !== undefined) properties.headers = { ...carrier, ...properties.headers };
    if (options.priority !== undefined) {
      if (!Number.isSafeInteger(options.priority) || options.priority < 0 || options.priority > 255)
        throw new RangeError(`priority must be a whole number from 0 to 255 (got ${options.priority})`);
      properties.priority = options.priority;
    }
    if (options.delayMs !== undefined) {
      if (!Number.isFinite(options.delayMs) || options.delayMs < 0 || options.delayMs > 2 ** 32 - 1)
        throw new RangeError(
          `delayMs must be a number of ms from 0 to ${2 ** 32 - 1} (got ${options.delayMs})`,
        );
      properties.headers = { ...properties.headers, 'x-delay': Math.ceil(options.delayMs) };
    }
    return { messageId, content: Buffer.from(body), properties };
  }

  /**
   * Publishes one message; `done` is called once, with nothing when the broker confirmed
   * it and with the reason otherwise. Returns false when the channel's buffer is full:
   * wait for its 'drain' before publishing more.
   */
  #publish(message: Outgoing, done: (err?: ClientError) => void): boolean {
    // A message that cannot go out fails at once, before this returns: sendMany then
    // sends nothing after it.
    if (this.#closed !== undefined) {
      done(this.#closed);
      return true;
    }
    const { messageId, content, properties } = message;
    const confirmed = (err: unknown) => {
      // The broker sends basic.return before the ack of the same message.
      const returned = this.#returned.get(messageId) ?? 0;
      if (returned > 0) {
        if (returned === 1) this.#returned.delete(messageId);
        else this.#returned.set(messageId, returned - 1);
        done(
          new ClientError(
            'ERR_UNROUTABLE',
            `no queue is bound to exchange "${this.exchange}" with routing key "${this.routingKey}": the broker dropped the message`,
          ),
        );
      } else if (err && this.#closed !== undefined) {
        // close() came before the confirm. (A loss fails the confirms before the client
        // hears of it: those say ERR_NOT_CONFIRMED, with the broker's reason.)
        done(new ClientError(this.#closed.code, this.#closed.message, { cause: err }));
      } else if (err) {
        const cause = this.#lastError ?? err;
        const why = this.#lastError?.message ?? (err instanceof Error ? err.message : String(err));
        done(
          new ClientError('ERR_NOT_CONFIRMED', `the broker did not confirm the message: ${why}`, { cause }),
        );
      } else done();
    };
    let room: boolean;
    try {
      room = this.#channel.publish(this.exchange, this.routingKey, content, properties, confirmed);
    } catch (err) {
      // amqplib throws at once on a channel that has closed or begun to close (its
      // IllegalOperationError), and on a message it cannot encode (a header table too
      // large for a frame, a value it cannot write).
      const why =
        this.#closed ??
        (isRefusedAsClosing(err)
          ? new ClientError('ERR_CLIENT_CLOSED', 'the channel is closed', { cause: err })
          : new ClientError('ERR_PUBLISH_REFUSED', `the message cannot be sent: ${String(err)}`, {
              cause: err,
            }));
      done(why);
      return true;
    }
    // A sendMany's publishes of one turn leave in one write.
    writeTogetherThisTurn(this.#channel);
    return room;
  }

  /**
   * Runs the task and resolves with its result. Rejects with a TaskCallError whose `kind`
   * is the outcome when the task did not succeed, and with a ClientError (ERR_CALL_TIMEOUT,
   * ERR_UNROUTABLE, ...) when no result can come.
   */
  async call<K extends TaskName<T>>(
    func: K,
    args: TaskArgs<T, K>,
    kwargs?: Record<string, unknown>,
    options: CallOptions = {},
  ): Promise<TaskResult<T, K>> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    if (this.#closed !== undefined) throw this.#closed;
    // Direct reply-to: the pseudo-queue is consumed (no ack) on this channel before any
    // publish that names it; one consumer serves every call, told apart by correlation id.
    this.#replies ??= this.#channel
      .consume(REPLY_TO, (m) => this.#onReply(m), { noAck: true })
      .catch((err: unknown) => {
        this.#replies = undefined;
        throw this.#closed ?? err;
      });
    await this.#replies;

    const correlationId = randomUUID();
    const { promise, resolve, reject } = Promise.withResolvers<unknown>();
    // The reply can come before the confirm (or instead of it, when the channel closes
    // in between); it is awaited below, so mark it handled to keep it from counting as
    // an unhandled rejection meanwhile.
    promise.catch(() => {});
    const timer = setTimeout(() => {
      this.#pending.delete(correlationId);
      reject(
        new ClientError(
          'ERR_CALL_TIMEOUT',
          `no result for ${func} within ${timeoutMs} ms (the task may still run)`,
        ),
      );
    }, timeoutMs);
    this.#pending.set(correlationId, (err, result) => {
      clearTimeout(timer);
      this.#pending.delete(correlationId);
      if (err === undefined) resolve(result);
      else reject(err);
    });
    try {
      await this.send(func, args, kwargs, {
        replyTo: REPLY_TO,
        correlationId,
        ...(options.messageId === undefined ? {} : { messageId: options.messageId }),
        ...(options.priority === undefined ? {} : { priority: options.priority }),
        ...(options.delayMs === undefined ? {} : { delayMs: options.delayMs }),
        ...(options.headers === undefined ? {} : { headers: options.headers }),
      });
    } catch (err) {
      this.#pending.get(correlationId)?.(err as Error);
    }
    return (await promise) as TaskResult<T, K>;
  }

  #onReply(m: ConsumeMessage | null): void {
    if (m === null) {
      this.#shut(new ClientError('ERR_CLIENT_CLOSED', 'the broker cancelled the reply consumer'));
      return;
    }
    const settle = this.#pending.get(String(m.properties.correlationId));
    if (settle === undefined) return; // a call that timed out already
    let reply: unknown;
    try {
      reply = JSON.parse(m.content.toString());
    } catch (err) {
      settle(new ClientError('ERR_BAD_REPLY', 'the reply is not JSON', { cause: err }));
      return;
    }
    const r = reply as { ok?: unknown; result?: unknown; error?: { kind?: unknown; message?: unknown } };
    if (r.ok === true) settle(undefined, r.result);
    else if (r.ok === false && typeof r.error?.kind === 'string' && KINDS.includes(r.error.kind))
      settle(new TaskCallError(r.error.kind as FailureKind, String(r.error.message ?? '')));
    else settle(new ClientError('ERR_BAD_REPLY', 'the reply is not {"ok": true, ...} or {"ok": false, ...}'));
  }

  /** Ends every pending call with `reason`; later calls reject with it too. */
  #shut(reason: ClientError): void {
    this.#closed ??= reason;
    for (const settle of [...this.#pending.values()]) settle(this.#closed);
  }

  /** Closes the connection; calls still waiting reject with ERR_CLIENT_CLOSED. Idempotent. */
  async close(): Promise<void> {
    this.#shut(new ClientError('ERR_CLIENT_CLOSED', 'the client is closed'));
    await this.#connection.close().catch(() => {});
  }
}

/** Connects and opens the confirm channel; resolves with a client ready to send. */
export async function createClient<T extends TaskModule = AnyTasks>(
  opts: ClientOptions = {},
): Promise<Client<T>> {
  // A comma-separated list (a cluster): the first node that answers, in a shuffled order.
  // No URL: the default accounts on localhost, in order (amqp/defaults.ts).
  const addresses =
    opts.url === undefined ? AddressList.accounts(DEFAULT_URLS) : new AddressList(splitUrls(opts.url));
  const { model: connection } = await openFirst(addresses, {
    purpose: 'client',
    connectTimeoutMs: opts.connectTimeoutMs ?? 10_000,
    logger: pino({ level: 'silent' }),
  });
  // Until the client listens itself: an 'error' event without a listener would throw.
  connection.on('error', () => {});
  let channel: ConfirmChannel;
  try {
    channel = await connection.createConfirmChannel();
  } catch (err) {
    await connection.close().catch(() => {});
    throw err;
  }
  return new Client<T>(
    connection,
    channel,
    opts.exchange ?? BROKER_DEFAULTS.exchange,
    opts.routingKey ?? BROKER_DEFAULTS.routingKey,
  );
}
