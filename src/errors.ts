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

export function serializeError(err: unknown): SerializedError {
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    return {
      name: err.name,
      message: err.message,
      ...(err.stack === undefined ? {} : { stack: err.stack }),
      ...(typeof code === 'string' ? { code } : {}),
    };
  }
  // A task may throw anything: a string, a number, a plain object.
  let message: string;
  try {
    message = typeof err === 'string' ? err : (JSON.stringify(err) ?? String(err));
  } catch {
    message = String(err);
  }
  return { name: 'NonError', message };
}

/** Exit codes of the CLI: 2 is "you asked for something that cannot run" (bad input). */
export function exitCodeFor(err: unknown): number {
  if (err instanceof ServiceError) {
    if (err.code === 'ERR_CONFIG' || err.code === 'ERR_TASK_MODULE' || err.code === 'ERR_TOPOLOGY') return 2;
  }
  return 1;
}
