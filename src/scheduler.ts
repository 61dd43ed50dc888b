// Which task goes to which worker, and when: the master's queue, the pipelining depth,
// dispatch and give-back. It owns no process; it asks each PoolWorker whether it can
// take more and hands it tasks.
//
// Speed: while tasks are short, a child may be handed several at once and runs them in
// order: as many as fit in PIPELINE_BUDGET_MS of work at the average duration (up to
// maxPipeline), so that what waits inside a child stays short whatever the task size.
// Every message to a child is a write that wakes it, which for tiny tasks costs more than
// the task; a deeper pipeline sends fewer, larger messages.
import type { Job } from './pool-job.ts';
import { LONG_TASK_MS, type PoolWorker } from './pool-worker.ts';

/** How much work (at the average task duration) a child may hold beyond the task it runs. */
const PIPELINE_BUDGET_MS = 2;

export interface SchedulerOptions {
  /** How many short tasks a child may hold at once (1: one at a time, no pipelining). */
  maxPipeline: number;
  /** A worker due for recycling after this many tasks is never handed more (0: no limit). */
  maxTasksPerWorker: number;
}

export class Scheduler {
  readonly #opts: SchedulerOptions;
  #queue: Job[] = [];
  /** Moving average of task run times, which decides whether to pipeline. */
  #averageMs: number | undefined;

  constructor(opts: SchedulerOptions) {
    this.#opts = opts;
  }

  /** Tasks waiting in the master. */
  get queued(): number {
    return this.#queue.length;
  }

  get averageMs(): number | undefined {
    return this.#averageMs;
  }

  push(job: Job): void {
    this.#queue.push(job);
  }

  /** Tasks a worker held and never started go back to the front of the queue, in order. */
  requeue(jobs: Job[]): void {
    if (jobs.length > 0) this.#queue.unshift(...jobs);
  }

  recordRun(ms: number): void {
    this.#averageMs = this.#averageMs === undefined ? ms : this.#averageMs * 0.8 + ms * 0.2;
  }

  /** Gives back up to `count` waiting tasks, the newest first; how many it gave back. */
  giveBack(count: number, reason: string): number {
    const jobs = this.#queue.splice(Math.max(0, this.#queue.length - count));
    for (const job of jobs) job.giveBack(reason);
    return jobs.length;
  }

  /** Gives back every waiting task (the drain). */
  giveBackAll(reason: string): void {
    for (const job of this.#queue.splice(0)) job.giveBack(reason);
  }

  /** Drops the waiting tasks whose delivery is abandoned (its channel closed); how many. */
  dropAbandoned(): number {
    const before = this.#queue.length;
    this.#queue = this.#queue.filter((job) => {
      if (!job.abandoned) return true;
      job.giveBack('its channel closed before it started');
      return false;
    });
    return before - this.#queue.length;
  }

  #depth(): number {
    if (this.#averageMs === undefined) return 1;
    const fits = Math.floor(PIPELINE_BUDGET_MS / Math.max(this.#averageMs, 0.001));
    return Math.max(1, Math.min(this.#opts.maxPipeline, fits));
  }

  /**
   * Hands waiting tasks to workers that can take them: the least loaded first, and only
   * workers whose code exports the task's func while one does (during a rolling reload,
   * old and new code run side by side). Whether anything was handed over.
   */
  dispatch(workers: ReadonlySet<PoolWorker>): boolean {
    const queue = this.#queue;
    if (queue.length === 0) {
      this.#rebalance(workers);
      return false;
    }
    const depth = this.#depth();
    const now = performance.now();
    const maxTasks = this.#opts.maxTasksPerWorker;
    // A pipelining worker is topped up once it has run down to half its depth, not after
    // every task: one message then carries many tasks instead of one each.
    const refillAt = Math.floor(depth / 2);
    const batches = new Map<PoolWorker, Job[]>();
    /** Tasks passed over because the workers whose code has their func are full (a reload). */
    let passedOver: Job[] | undefined;
    while (queue.length > 0) {
      // Look before taking: when nobody can take anything, the queue is left as it is.
      const job = queue[0] as Job;
      if (job.abandoned) {
        queue.shift();
        job.giveBack('its channel closed before it started');
        continue;
      }
      const func = job.request.func;
      let best: PoolWorker | undefined;
      let bestLoad = 0;
      let fallback: PoolWorker | undefined;
      let fallbackLoad = 0;
      let anyKnows = false;
      for (const w of workers) {
        const knows = w.funcs.has(func);
        if (knows && w.isUp) anyKnows = true;
        const planned = batches.get(w)?.length ?? 0;
        if (planned === 0 && w.held > refillAt) continue;
        if (!w.canTake(planned, depth, now, maxTasks)) continue;
        const load = w.held + planned;
        if (knows && (best === undefined || load < bestLoad)) {
          best = w;
          bestLoad = load;
        }
        if (fallback === undefined || load < fallbackLoad) {
          fallback = w;
          fallbackLoad = load;
        }
      }
      // No worker's code exports it: the child answers for it (an unknown func fails).
      if (best === undefined && !anyKnows) best = fallback;
      if (best === undefined) {
        if (fallback === undefined) break; // nobody can take anything: the rest wait too
        passedOver ??= [];
        passedOver.push(queue.shift() as Job);
        continue;
      }
      queue.shift();
      const batch = batches.get(best);
      if (batch === undefined) batches.set(best, [job]);
      else batch.push(job);
    }
    if (passedOver !== undefined) queue.unshift(...passedOver);
    for (const [w, jobs] of batches) w.hand(jobs);
    return batches.size > 0;
  }

  /** A worker idles with nothing queued while another holds tasks behind a long one: take them back. */
  #rebalance(workers: ReadonlySet<PoolWorker>): void {
    let idle = false;
    for (const w of workers) if (w.state === 'idle' && w.isLive) idle = true;
    if (!idle) return;
    const now = performance.now();
    for (const w of workers) {
      const running = w.running;
      if (w.held > 1 && running !== undefined && now - running.startedAt >= LONG_TASK_MS) w.takeBack();
    }
  }
}
