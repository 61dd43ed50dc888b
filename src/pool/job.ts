// One task as the pool carries it, from `run()` to its result. Its result is given
// exactly once, whatever races between a result, a timeout, a kill, an exit and a drain:
// `end` ignores every call after the first, so no path can settle a delivery twice.
import { type SerializedError, taskFailure } from '../errors.ts';
import type { RunTask } from '../ipc/protocol.ts';

/** A task as the dispatcher asks for it: what the child runs, less the pool's own id. */
export interface TaskRequest extends Omit<RunTask, 'taskId' | 'redelivered' | 'attempt' | 'wantResult'> {
  redelivered: boolean;
  attempt: number;
  wantResult: boolean;
  /**
   * True once running it would be pointless: its delivery's channel has closed, so the
   * broker has already given the message to the queue again. Asked before it starts.
   */
  abandoned?: () => boolean;
  /** The caller's own record of the task, handed back by Pool.running(). */
  owner?: unknown;
  /** The message's priority: the master's queue runs higher first (0 when none). */
  priority?: number;
  /** Called when it starts in a worker (its span's `started` event). */
  onStart?: () => void;
}

export type JobResult =
  | { outcome: 'succeeded'; resultJson: string | undefined; durationMs: number }
  | { outcome: 'failed' | 'timeout' | 'crashed' | 'cancelled'; error: SerializedError; durationMs: number }
  /**
   * Never ran to an end: given back (a drain, a shrinking window, a dead channel), so the
   * message goes back; with `delayMs`, through a delay queue (held back past its limit).
   */
  | { outcome: 'returned'; reason: string; delayMs?: number };

export class Job {
  readonly taskId: number;
  readonly request: TaskRequest;
  /** Told the result, once (Pool.submit's onEnd). */
  readonly #onEnd: (result: JobResult) => void;
  /** When it started in its child (performance.now()), 0 until then. */
  startedAt = 0;
  /** When its time limit passes (performance.now()), once it has started; its slot watches it. */
  deadlineAt = 0;
  /** The master's timer for it after its time limit or a cancel: the kill at the end of the grace. */
  timer: NodeJS.Timeout | undefined;
  /** Set once the time limit has passed: whatever the task does next, it is a timeout. */
  timedOut = false;
  /** Set when an operator cancels it: whatever it does next, it ends cancelled. */
  cancelled = false;
  /** Its function's concurrency limit, while it holds one of its places (see FuncLimits). */
  place: { release(): void } | undefined;
  /** When its function's limit first held it back in the master's queue (performance.now(); 0: never). */
  queuedAt = 0;
  /** The limits it has been held back by, as bits (see Scheduler): each is counted once. */
  heldBack = 0;
  /** Its message's priority (0 to 255; higher runs first). */
  readonly priority: number;
  #ended = false;

  constructor(taskId: number, request: TaskRequest, onEnd: (result: JobResult) => void) {
    this.taskId = taskId;
    this.request = request;
    this.#onEnd = onEnd;
    this.priority = request.priority ?? 0;
  }

  /** Gives back its place under its function's concurrency limit, if it holds one. */
  releasePlace(): void {
    const place = this.place;
    this.place = undefined;
    place?.release();
  }

  get ended(): boolean {
    return this.#ended;
  }

  get abandoned(): boolean {
    return this.request.abandoned?.() === true;
  }

  /** Gives the result; only the first call counts. */
  end(result: JobResult): void {
    if (this.#ended) return;
    this.#ended = true;
    this.releasePlace();
    clearTimeout(this.timer);
    this.timer = undefined;
    this.#onEnd(result);
  }

  giveBack(reason: string): void {
    this.end({ outcome: 'returned', reason });
  }

  /**
   * Ends it unrun at the drain: `cancelled` when an operator cancelled it (its channel
   * still open), else given back. A cancel that came during the drain must not turn into
   * a requeue, or the task runs later elsewhere though its canceller was told otherwise.
   */
  endUnrun(reason: string): void {
    if (this.cancelled && !this.abandoned) this.endCancelled();
    else this.giveBack(reason);
  }

  /** An operator cancelled it before it started: it ends `cancelled`, unrun. */
  endCancelled(): void {
    this.end({ outcome: 'cancelled', error: taskFailure.cancelled(false), durationMs: 0 });
  }

  /** What its child is sent to run it; `ownTimeoutMs`: its function's own time limit, if it has one. */
  frame(ownTimeoutMs: number | undefined): RunTask {
    const request = this.request;
    const task: RunTask = {
      taskId: this.taskId,
      func: request.func,
      args: request.args,
      kwargs: request.kwargs,
      messageId: request.messageId,
    };
    // Only what differs from the child's defaults (protocol.ts).
    if (request.redelivered) task.redelivered = true;
    if (request.attempt !== 1) task.attempt = request.attempt;
    if (request.wantResult) task.wantResult = true;
    if (request.exactJson !== undefined) task.exactJson = request.exactJson;
    if (request.traceparent !== undefined) {
      task.traceparent = request.traceparent;
      if (request.tracestate !== undefined) task.tracestate = request.tracestate;
    }
    if (ownTimeoutMs !== undefined) task.timeoutMs = ownTimeoutMs;
    return task;
  }
}
