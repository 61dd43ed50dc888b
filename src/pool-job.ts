// One task as the pool carries it, from `run()` to its result. Its result is given
// exactly once, whatever races between a result, a timeout, a kill, an exit and a drain:
// `end` ignores every call after the first, so no path can settle a delivery twice.
import type { SerializedError } from './errors.ts';
import type { RunTask } from './protocol.ts';

/** A task as the dispatcher asks for it: what the child runs, less the pool's own id. */
export interface TaskRequest extends Omit<RunTask, 'taskId'> {
  /**
   * True once running it would be pointless: its delivery's channel has closed, so the
   * broker has already given the message to the queue again. Asked before it starts.
   */
  abandoned?: () => boolean;
}

export type TaskResult =
  | { outcome: 'succeeded'; resultJson: string | undefined; durationMs: number }
  | { outcome: 'failed' | 'timeout' | 'crashed'; error: SerializedError; durationMs: number }
  /** Never ran to an end: given back (a drain, a shrinking window, a dead channel), so the message goes back. */
  | { outcome: 'returned'; reason: string };

export class Job {
  readonly taskId: number;
  readonly request: TaskRequest;
  readonly #resolve: (result: TaskResult) => void;
  /** When it started in its child (performance.now()), 0 until then. */
  startedAt = 0;
  /** The master's deadline for it (the time limit, then the kill grace). */
  timer: NodeJS.Timeout | undefined;
  /** Set once the time limit has passed: whatever the task does next, it is a timeout. */
  timedOut = false;
  #ended = false;

  constructor(taskId: number, request: TaskRequest, resolve: (result: TaskResult) => void) {
    this.taskId = taskId;
    this.request = request;
    this.#resolve = resolve;
  }

  get ended(): boolean {
    return this.#ended;
  }

  get abandoned(): boolean {
    return this.request.abandoned?.() === true;
  }

  /** Gives the result; only the first call counts. */
  end(result: TaskResult): void {
    if (this.#ended) return;
    this.#ended = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.#resolve(result);
  }

  giveBack(reason: string): void {
    this.end({ outcome: 'returned', reason });
  }
}
