// What a producer writes when it sends: the task names, arguments and results its task
// module's types allow (a wrong argument is a compile error), and the options of the
// client's calls. Types only; the client (client.ts) is the code.

// biome-ignore lint/suspicious/noExplicitAny: task signatures are the caller's; any keeps them open
type AnyTask = (...args: any[]) => unknown;
/** A task module's type, as `typeof import('./tasks.ts')` gives it. */
export type TaskModule = object;
/** The client's types when no task module is given: any name, any arguments, an unknown result. */
export type AnyTasks = Record<string, AnyTask>;
/** The names a message can call: the module's exported functions (never `default`). */
export type TaskName<T> = Exclude<
  { [K in keyof T]-?: T[K] extends AnyTask ? K : never }[keyof T],
  'default'
> &
  string;
export type TaskArgs<T, K extends keyof T> = T[K] extends AnyTask ? Parameters<T[K]> : never;
export type TaskResult<T, K extends keyof T> = T[K] extends AnyTask ? Awaited<ReturnType<T[K]>> : never;

export interface ClientOptions {
  /**
   * Default: as the service's, testuser on localhost, then RabbitMQ's own guest account
   * there. A heartbeat of 10 s is added unless given. A comma-separated list of URLs (a
   * cluster) is tried in a shuffled order.
   */
  url?: string;
  /** The deadline of the TCP connect and AMQP handshake with each broker (default 10 s). */
  connectTimeoutMs?: number;
  /** Default: curio_amqp_exchange, as the service's. */
  exchange?: string;
  /** Default: curio_amqp, as the service's. */
  routingKey?: string;
}

export interface SendOptions {
  /** Default: a random UUID. The service uses it to recognise a redelivered message. */
  messageId?: string;
  replyTo?: string;
  correlationId?: string;
  headers?: Record<string, unknown>;
  /** 0 to 255; higher runs first (README "Priorities"). */
  priority?: number;
  /** Run no earlier than this many ms from now: the `x-delay` header (README "Delayed tasks"). */
  delayMs?: number;
}

export interface CallOptions {
  /** How long to wait for the result, from the call on (default 30 s). */
  timeoutMs?: number;
  messageId?: string;
  priority?: number;
  delayMs?: number;
  headers?: Record<string, unknown>;
}

/** One task for sendMany: send's arguments as one object. */
export type TaskItem<T> = {
  [K in TaskName<T>]: {
    func: K;
    args: TaskArgs<T, K>;
    kwargs?: Record<string, unknown>;
    options?: SendOptions;
  };
}[TaskName<T>];

export interface SendManyOptions {
  /**
   * How many messages may wait for their confirm at once (default 1,000). A larger window
   * keeps more in the client's memory and in flight; 1 is send() one after another.
   */
  window?: number;
}
