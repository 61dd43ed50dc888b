// The producer side: send a task (confirmed by the broker) or call one and await its
// result through RabbitMQ's direct reply-to. Types flow from the task module:
//
//   import type * as tasks from './tasks/index.ts';
//   const client = await createClient<typeof tasks>();
//   const sum = await client.call('test', [1, 2]);   // number; a wrong argument is a compile error
import { randomUUID } from 'node:crypto';
import amqp, { type ChannelModel, type ConfirmChannel } from 'amqplib';
import { DEFAULT_AMQP_URL } from './config.ts';

// biome-ignore lint/suspicious/noExplicitAny: task signatures are the caller's; any keeps them open
type AnyTask = (...args: any[]) => unknown;
export type TaskModule = Record<string, unknown>;
type TaskNames<T> = { [K in keyof T]: T[K] extends AnyTask ? K : never }[keyof T] & string;
type ArgsOf<T, K extends keyof T> = T[K] extends AnyTask ? Parameters<T[K]> : never;
type ResultOf<T, K extends keyof T> = T[K] extends AnyTask ? Awaited<ReturnType<T[K]>> : never;

export interface ClientOptions {
  url?: string;
  exchange?: string;
  routingKey?: string;
}

/** A task that ended otherwise than succeeded; `kind` is its outcome. */
export class TaskCallError extends Error {
  readonly code: string;
  readonly kind: string;
  constructor(kind: string, message: string, code = 'ERR_TASK_CALL') {
    super(message);
    this.name = 'TaskCallError';
    this.kind = kind;
    this.code = code;
  }
}

const REPLY_TO = 'amq.rabbitmq.reply-to';

export class Client<T extends TaskModule> {
  readonly #connection: ChannelModel;
  readonly #channel: ConfirmChannel;
  readonly #exchange: string;
  readonly #routingKey: string;
  readonly #pending = new Map<string, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #replies: Promise<unknown> | undefined;

  constructor(connection: ChannelModel, channel: ConfirmChannel, exchange: string, routingKey: string) {
    this.#connection = connection;
    this.#channel = channel;
    this.#exchange = exchange;
    this.#routingKey = routingKey;
  }

  /** Publishes the task and resolves with its message id once the broker has confirmed it. */
  async send<K extends TaskNames<T>>(
    func: K,
    args: ArgsOf<T, K>,
    kwargs?: Record<string, unknown>,
    options: { messageId?: string; replyTo?: string; correlationId?: string } = {},
  ): Promise<string> {
    const messageId = options.messageId ?? randomUUID();
    const body = Buffer.from(JSON.stringify(kwargs === undefined ? { func, args } : { func, args, kwargs }));
    await new Promise<void>((resolve, reject) => {
      this.#channel.publish(
        this.#exchange,
        this.#routingKey,
        body,
        {
          persistent: true,
          contentType: 'application/json',
          messageId,
          ...(options.replyTo === undefined ? {} : { replyTo: options.replyTo }),
          ...(options.correlationId === undefined ? {} : { correlationId: options.correlationId }),
        },
        (err) => (err ? reject(new Error('the broker did not confirm the message')) : resolve()),
      );
    });
    return messageId;
  }

  /** Runs the task and resolves with its result; rejects with a TaskCallError for another outcome or a timeout. */
  async call<K extends TaskNames<T>>(
    func: K,
    args: ArgsOf<T, K>,
    kwargs?: Record<string, unknown>,
    { timeoutMs = 30_000 }: { timeoutMs?: number } = {},
  ): Promise<ResultOf<T, K>> {
    // Direct reply-to: consume the pseudo-queue (no ack) on this channel before publishing.
    this.#replies ??= this.#channel.consume(
      REPLY_TO,
      (m) => {
        if (m === null) return;
        const waiting = this.#pending.get(String(m.properties.correlationId));
        if (waiting === undefined) return;
        this.#pending.delete(String(m.properties.correlationId));
        try {
          const reply = JSON.parse(m.content.toString()) as
            | { ok: true; result: unknown }
            | { ok: false; error: { kind: string; message: string } };
          if (reply.ok) waiting.resolve(reply.result);
          else waiting.reject(new TaskCallError(reply.error.kind, reply.error.message));
        } catch (err) {
          waiting.reject(err as Error);
        }
      },
      { noAck: true },
    );
    await this.#replies;
    const correlationId = randomUUID();
    const result = new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(correlationId);
        reject(
          new TaskCallError('timeout', `no result for ${func} within ${timeoutMs} ms`, 'ERR_CALL_TIMEOUT'),
        );
      }, timeoutMs);
      this.#pending.set(correlationId, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
    });
    await this.send(func, args, kwargs, { replyTo: REPLY_TO, correlationId });
    return (await result) as ResultOf<T, K>;
  }

  async close(): Promise<void> {
    for (const [, waiting] of this.#pending) waiting.reject(new Error('the client closed'));
    this.#pending.clear();
    await this.#connection.close().catch(() => {});
  }
}

export async function createClient<T extends TaskModule = TaskModule>(
  opts: ClientOptions = {},
): Promise<Client<T>> {
  const connection = await amqp.connect(opts.url ?? DEFAULT_AMQP_URL);
  const channel = await connection.createConfirmChannel();
  channel.on('error', () => {}); // surfaced through the publish callbacks and close
  return new Client<T>(
    connection,
    channel,
    opts.exchange ?? 'curio_amqp_exchange',
    opts.routingKey ?? 'curio_amqp',
  );
}
