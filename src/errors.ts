// Every error the service and its client make, in one place. Errors are values with a
// stable `code`: callers, the CLI's exit codes and the tests match on the code, never on
// message text (the fastify/undici convention). README's "Error codes" lists each code
// below; test/unit/errors.test.ts fails when one is missing there.

/** Every code, with what it means. The one list: the types and README's table follow it. */
export const ERROR_CODES = {
  // Start-up: exit code 2, "you asked for something that cannot run".
  ERR_CONFIG: 'a bad flag or environment value',
  ERR_TASK_MODULE: 'the task module cannot be loaded, or exits while loading',
  ERR_TOPOLOGY: 'a declaration clashed with an existing queue or exchange of other settings',
  // Running: the service stops with exit code 1.
  ERR_WORKER_BOOT: 'replacement workers keep failing to start',
  ERR_WORKER_SPAWN:
    'the system could not start a worker process (out of file descriptors or processes): retried with backoff, never fatal',
  ERR_POOL_CLOSED: 'the pool is shutting down and takes no more work',
  // Task failures the master makes (the error of a `timeout` or `crashed` outcome).
  ERR_TASK_TIMEOUT: 'the task ran past its time limit',
  ERR_WORKER_CRASHED: 'the worker process died while running the task',
  ERR_DISPATCH: 'the task could not be handed to a worker, or handling its delivery failed',
  ERR_CRASH_LOOP: 'the service stopped each time it handled this message',
  ERR_TASK_CANCELLED: 'an operator cancelled the task (DELETE /tasks/{id} or amqp-concurrency cancel)',
  // Broker I/O.
  ERR_DEADLINE: 'a step of reaching the broker took longer than --connect-timeout',
  ERR_UNROUTABLE: 'no queue is bound for the exchange and routing key: the broker returned the message',
  ERR_NOT_CONFIRMED: 'the broker nacked the message, or the channel closed before it confirmed',
  ERR_PUBLISH_REFUSED:
    'a publish that can never succeed: it cannot be encoded (a header table too large or malformed), or the broker refused it (406) again',
  // The client (producers).
  ERR_CALL_TIMEOUT: 'no result within timeoutMs; the task may still run',
  ERR_CLIENT_CLOSED: 'close() was called, or the connection or channel closed',
  ERR_BAD_REPLY: 'the reply was not {"ok": ...} JSON',
  ERR_TASK_CALL: 'the task ended otherwise than succeeded; `kind` is its outcome',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** Codes that mean "this cannot run as asked": the CLI exits 2 on them. */
const USAGE_CODES: ReadonlySet<ErrorCode> = new Set(['ERR_CONFIG', 'ERR_TASK_MODULE', 'ERR_TOPOLOGY']);

export class ServiceError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ServiceError';
    this.code = code;
  }
}

/** A step of reaching the broker passed the connect deadline. */
export class DeadlineError extends Error {
  readonly code = 'ERR_DEADLINE';
  constructor(what: string, ms: number) {
    super(`${what} took longer than the connect timeout of ${ms / 1000} s`);
    this.name = 'DeadlineError';
  }
}

/** A mandatory publish that the broker returned: nothing would have received it. */
export class UnroutableError extends Error {
  readonly code = 'ERR_UNROUTABLE';
  constructor(exchange: string, routingKey: string, replyText: string) {
    super(
      `the broker could not route the message to ${JSON.stringify(routingKey)} on ${exchange === '' ? 'the default exchange' : JSON.stringify(exchange)} (${replyText})`,
    );
    this.name = 'UnroutableError';
  }
}

/**
 * A publish that trying again cannot help: amqplib could not encode it, or the broker
 * closed the channel with a 406 (a message over its max_message_size, say) on a second try.
 */
export class PublishRefusedError extends Error {
  readonly code = 'ERR_PUBLISH_REFUSED';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'PublishRefusedError';
  }
}

/** The outcomes other than `succeeded` (README "The message"). */
export type FailureKind = 'failed' | 'timeout' | 'crashed' | 'rejected' | 'cancelled';

/** A task called through the client ended otherwise than succeeded; `kind` is its outcome. */
export class TaskCallError extends Error {
  readonly code = 'ERR_TASK_CALL';
  readonly kind: FailureKind;
  constructor(kind: FailureKind, message: string) {
    super(message);
    this.name = 'TaskCallError';
    this.kind = kind;
  }
}

export type ClientErrorCode = Extract<
  ErrorCode,
  | 'ERR_CALL_TIMEOUT'
  | 'ERR_UNROUTABLE'
  | 'ERR_NOT_CONFIRMED'
  | 'ERR_CLIENT_CLOSED'
  | 'ERR_BAD_REPLY'
  | 'ERR_PUBLISH_REFUSED'
>;

/** What went wrong on the client's side, rather than in the task. */
export class ClientError extends Error {
  readonly code: ClientErrorCode;
  constructor(code: ClientErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ClientError';
    this.code = code;
  }
}

/**
 * sendMany's error: the broker refused one of the batch (or the connection went), and
 * nothing after it was sent. Its code is that first failure's. The ids and `confirmed`
 * are by index in the batch. Only the confirmed are certainly in the queue; one whose
 * confirm was lost with the connection may be there too, so a resend may run it twice.
 */
export class SendManyError extends ClientError {
  /** Every task's message id, in the order given, sent or not. */
  readonly messageIds: readonly string[];
  /** Whether the broker confirmed each: only those are certainly in the queue. */
  readonly confirmed: readonly boolean[];
  constructor(first: ClientError, messageIds: readonly string[], confirmed: readonly boolean[]) {
    const missing = confirmed.filter((c) => !c).length;
    super(first.code, `${missing} of ${messageIds.length} tasks were not confirmed: ${first.message}`, {
      cause: first,
    });
    this.name = 'SendManyError';
    this.messageIds = messageIds;
    this.confirmed = confirmed;
  }
}

/** The plain shape an error takes when it crosses IPC (structured clone or JSON). */
export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
  code?: string;
}

/**
 * The task failures the master makes itself, named and coded alike: the `error` of a
 * `timeout` or `crashed` outcome, which goes into logs, replies and `x-error-message`.
 */
export const taskFailure = {
  timeout(limitMs: number, stoppedOnSignal: boolean): SerializedError {
    const seconds = limitMs / 1000;
    return {
      name: 'TaskTimeoutError',
      message: stoppedOnSignal
        ? `task ran past its time limit of ${seconds} s and stopped on its AbortSignal`
        : `task ran past its time limit of ${seconds} s`,
      code: 'ERR_TASK_TIMEOUT',
    };
  },
  crashed(how: string): SerializedError {
    return {
      name: 'WorkerCrashedError',
      message: `the worker process died while running the task (${how})`,
      code: 'ERR_WORKER_CRASHED',
    };
  },
  /** A worker broke the protocol (a malformed frame or result line): it is killed for it. */
  protocol(problem: string): SerializedError {
    return {
      name: 'WorkerCrashedError',
      message: `the worker broke the protocol and was killed: ${problem}`,
      code: 'ERR_WORKER_CRASHED',
    };
  },
  dispatch(what: string, cause: SerializedError): SerializedError {
    return { name: 'DispatchError', message: `${what}: ${cause.message}`, code: 'ERR_DISPATCH' };
  },
  /** An operator cancelled it: before it started (`running` false), or while it ran. */
  cancelled(running: boolean): SerializedError {
    return {
      name: 'TaskCancelledError',
      message: running
        ? 'the task was cancelled while it ran: it got its AbortSignal, then its worker was stopped'
        : 'the task was cancelled before it ran',
      code: 'ERR_TASK_CANCELLED',
    };
  },
  crashLoop(deaths: number): SerializedError {
    return {
      name: 'CrashLoopError',
      message: `the service stopped ${deaths} times while handling this message`,
      code: 'ERR_CRASH_LOOP',
    };
  },
} as const;

/** The longest message or stack kept: an error is a report, not a payload. */
const MAX_TEXT = 4_000;

/** Reads a property that may be a getter that throws, or anything but a string. */
function textOf(read: () => unknown): string | undefined {
  try {
    const value = read();
    if (value === undefined || value === null) return undefined;
    const text = typeof value === 'string' ? value : describe(value);
    return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT)}…` : text;
  } catch {
    return undefined;
  }
}

/** A value as text, for anything a task may throw: cyclic, with a throwing toString, a symbol. */
function describe(value: unknown): string {
  try {
    if (typeof value === 'string') return value;
    const json = JSON.stringify(value);
    if (json !== undefined) return json;
  } catch {
    // cyclic, a BigInt, a throwing toJSON: fall through
  }
  try {
    return String(value);
  } catch {
    return Object.prototype.toString.call(value);
  }
}

/** Whether a non-Error value still looks like one (a library that throws plain objects). */
function errorLike(value: unknown): value is { message: unknown; name?: unknown; code?: unknown } {
  try {
    return (
      typeof value === 'object' &&
      value !== null &&
      typeof (value as { message?: unknown }).message === 'string'
    );
  } catch {
    return false;
  }
}

/**
 * The plain, always-valid form of any thrown value: every field a string, never a throw
 * of its own, whatever getters, cycles or types the thrown value has. IPC, replies, dead
 * letters and every log line use it (see logger.ts).
 */
export function serializeError(err: unknown): SerializedError {
  if (err instanceof Error || errorLike(err)) {
    const e = err as Error & { code?: unknown };
    const code = textOf(() => e.code);
    const stack = textOf(() => e.stack);
    return {
      name: textOf(() => e.name) ?? 'Error',
      message: textOf(() => e.message) ?? '(an error without a message)',
      ...(stack === undefined ? {} : { stack }),
      ...(code === undefined ? {} : { code }),
    };
  }
  // A task may throw anything: a string, a number, a plain object, undefined.
  return { name: 'NonError', message: textOf(() => describe(err)) ?? String(err) };
}

/** Exit codes of the CLI: 2 is "you asked for something that cannot run" (bad input). */
export function exitCodeFor(err: unknown): number {
  return err instanceof ServiceError && USAGE_CODES.has(err.code) ? 2 : 1;
}
