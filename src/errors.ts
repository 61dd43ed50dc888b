// Errors are values with a stable `code`: callers, the CLI's exit codes and the tests
// match on the code, never on message text (the fastify/undici convention).

export type ErrorCode =
  | 'ERR_CONFIG' // a bad flag or env value: exit 2
  | 'ERR_TASK_MODULE' // the task module cannot be loaded: exit 2
  | 'ERR_TOPOLOGY' // a declare clashed with an existing queue or exchange: exit 2
  | 'ERR_WORKER_BOOT' // replacement workers keep failing to start
  | 'ERR_TASK_FAILED' // a task threw or rejected
  | 'ERR_TASK_TIMEOUT'
  | 'ERR_WORKER_CRASHED'
  | 'ERR_POOL_CLOSED';

export class ServiceError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ServiceError';
    this.code = code;
  }
}

/** The plain shape an error takes when it crosses IPC (structured clone or JSON). */
export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
  code?: string;
}

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

/**
 * The plain, always-valid form of whatever a task threw: every field a string, never a
 * throw of its own, whatever getters, cycles or types the thrown value has.
 */
export function serializeError(err: unknown): SerializedError {
  if (err instanceof Error) {
    const code = textOf(() => (err as { code?: unknown }).code);
    const stack = textOf(() => err.stack);
    return {
      name: textOf(() => err.name) ?? 'Error',
      message: textOf(() => err.message) ?? '(an error without a message)',
      ...(stack === undefined ? {} : { stack }),
      ...(code === undefined ? {} : { code }),
    };
  }
  // A task may throw anything: a string, a number, a plain object, undefined.
  return { name: 'NonError', message: textOf(() => describe(err)) ?? String(err) };
}

/** Exit codes of the CLI: 2 is "you asked for something that cannot run" (bad input). */
export function exitCodeFor(err: unknown): number {
  if (err instanceof ServiceError) {
    if (err.code === 'ERR_CONFIG' || err.code === 'ERR_TASK_MODULE' || err.code === 'ERR_TOPOLOGY') return 2;
  }
  return 1;
}
