// How the running task of one worker is stopped: at its time limit, or by an operator's
// cancel. Both go the same way, after gunicorn's graceful timeout: the task's
// AbortSignal fires in the child (an abort frame), the tasks held behind it are asked
// back, and the worker is killed if the task has not ended within its grace (for a time
// limit with no grace, at once). The clock is the master's, on the monotonic clock: a
// stuck child cannot stop its own kill. One watch per worker (limit-watch.ts) keeps the
// running task's time limit. The slot (slot.ts) owns the worker; this owns the stop.
import type { Logger } from 'pino';
import type { Job } from './job.ts';
import { LimitWatch } from './limit-watch.ts';

/** What a stop needs of the slot of its worker. */
export interface TaskStopHost {
  readonly log: Logger;
  /** The task running now (the first the worker holds), if any. */
  running(): Job | undefined;
  /** The master is ending the worker already (a kill or a retirement under way). */
  ending(): boolean;
  pid(): number | undefined;
  /** A task's time limit (ms): its function's own, or the pool's. */
  timeoutOf(job: Job): number;
  /** Between a task's signal and its kill (ms): its function's own grace, or the pool's. */
  graceOf(job: Job): number;
  /** Fires the running task's AbortSignal in the child; `cancel`: an operator's, not its time limit. */
  abort(job: Job, reason: string, cancel: boolean): void;
  /** Asks the child for the tasks it holds behind the running one. */
  takeBack(): void;
  kill(why: 'timeout' | 'cancel'): void;
}

export class TaskStop {
  readonly #host: TaskStopHost;
  readonly #watch = new LimitWatch(() => this.#onWatch());

  constructor(host: TaskStopHost) {
    this.#host = host;
  }

  /** `job` starts running now: its clock starts, and its time limit is watched. */
  started(job: Job): void {
    // A task handed back (a cancel) and handed out again may still carry its old timer.
    clearTimeout(job.timer);
    job.timer = undefined;
    const now = performance.now();
    job.startedAt = now;
    // Cancelled while it waited in the child, which started it before it could give it back.
    if (job.cancelled) {
      queueMicrotask(() => this.cancelled(job));
      return;
    }
    job.deadlineAt = now + this.#host.timeoutOf(job);
    this.#watch.watch(job.deadlineAt, now);
    job.request.onStart?.();
  }

  /** An operator cancelled `job`, the running task: its signal now, its worker's kill after its grace. */
  cancelled(job: Job): void {
    const host = this.#host;
    if (host.running() !== job || job.ended || host.ending()) return;
    const graceMs = host.graceOf(job);
    const fields = { pid: host.pid(), taskId: job.taskId, func: job.request.func, killGraceMs: graceMs };
    host.log.warn(fields, 'task cancelled; aborting it');
    // Past its time limit already: its signal has fired and its kill is counting down.
    if (job.timedOut && job.timer !== undefined) return;
    host.abort(job, 'the task was cancelled', true);
    host.takeBack();
    clearTimeout(job.timer);
    job.timer = setTimeout(() => {
      job.timer = undefined;
      if (host.running() !== job || job.ended) return;
      host.log.warn(fields, 'cancelled task did not stop in its grace; killing its worker');
      host.kill('cancel');
    }, graceMs);
  }

  /** The worker has exited: nothing is left to watch. */
  stop(): void {
    this.#watch.stop();
  }

  /** The watch fired: the task running now is past its time limit, or the watch sleeps until it is. */
  #onWatch(): void {
    const job = this.#host.running();
    if (job === undefined || job.ended || job.cancelled || job.timedOut || job.startedAt === 0) return;
    const now = performance.now();
    // Node's timers count whole milliseconds: one may fire a fraction early.
    if (now < job.deadlineAt - 1) this.#watch.watch(job.deadlineAt, now);
    else this.#timeLimit(job);
  }

  /**
   * The time limit: abort and allow the grace, or kill now. One turn of the event loop
   * first: timers run before the master reads its pipes, and a result waiting there
   * (the master was busy, or frozen) means the task finished in time.
   */
  #timeLimit(job: Job): void {
    setImmediate(() => this.#pastTimeLimit(job));
  }

  #pastTimeLimit(job: Job): void {
    const host = this.#host;
    if (host.running() !== job || job.ended || job.cancelled) return;
    job.timedOut = true;
    const fields = { pid: host.pid(), taskId: job.taskId, func: job.request.func };
    const graceMs = host.graceOf(job);
    if (graceMs > 0) {
      host.log.warn({ ...fields, killGraceMs: graceMs }, 'task reached its time limit; aborting it');
      host.abort(job, 'the task reached its time limit', false);
      host.takeBack();
      job.timer = setTimeout(() => {
        if (host.running() !== job || job.ended) return;
        host.log.warn(fields, 'task did not stop in its grace; killing its worker');
        host.kill('timeout');
      }, graceMs);
      return;
    }
    host.log.warn(fields, 'task timed out; killing its worker');
    host.kill('timeout');
  }
}
