// Which task goes to which worker, and when: the master's queue, the pipelining depth,
// dispatch and give-back. It owns no process; it asks each Slot whether it can
// take more and hands it tasks.
//
// Speed: a child holds the next task behind the one it runs, whatever their length, so
// that it starts it the moment the last ends instead of a round trip through the master
// later: with every core busy running tasks, that round trip waits for the kernel to run
// the master (1.4 ms at the median per 10 ms task on two cores, an eighth of the
// throughput). A task held behind one that turns out long is taken back when another
// worker could start it sooner (#rebalance), so it waits about as long as it would have
// here. While tasks are short, a child may be handed several at once and runs them in
// order: as many as fit in PIPELINE_BUDGET_MS of work at the average duration (up to
// maxPipeline), so that what waits inside a child stays short whatever the task size.
// Every message to a child is a write that wakes it, which for tiny tasks costs more than
// the task; a deeper pipeline sends fewer, larger messages. For the same reason tiny
// tasks are packed (PACK_BELOW_MS): each goes to the busiest worker that may be topped
// up and is running tiny tasks now, so that one worker runs them while the others sleep,
// instead of every worker being woken for a share of a few.

import type { FuncLimits, LimitKind } from './func-limits.ts';
import { LONG_TASK_MS } from './hold-rule.ts';
import type { Job } from './job.ts';
import type { SlotState } from './slot.ts';

/** What the scheduler asks of a slot and tells it (Slot in slot.ts; fakes in the unit tests). */
export interface SchedulerSlot {
  /** The names its task code exports. */
  readonly funcs: ReadonlySet<string>;
  readonly isUp: boolean;
  readonly isLive: boolean;
  readonly state: SlotState;
  /** Tasks handed to it and not resolved. */
  readonly held: number;
  /** The task it runs now. */
  readonly running: Job | undefined;
  /** Whether it may take one more task now, beyond `planned` about to be handed (Slot.canTake). */
  canTake(planned: number, depth: number, now: number, maxTasks: number, longMs: number): boolean;
  hand(jobs: Job[]): void;
  /** Asks for the tasks it holds and has not started. */
  takeBack(): void;
}

/** How much work (at the average task duration) a child may hold beyond the task it runs. */
const PIPELINE_BUDGET_MS = 2;
/**
 * Tasks shorter than this on average are packed onto the busiest worker that may be
 * topped up rather than spread: waking a second worker costs more than the task. On two
 * cores a wake-up across CPUs is some 20 µs a round trip and 6 µs of the waker's CPU (see
 * docs/benchmarks.md), so spreading a few tiny tasks buys no parallelism worth having and
 * costs CPU the master and the broker need. Packing keeps nothing in the master's queue
 * that spreading would hand out: once the busiest worker is full (its pipeline depth, or
 * past half of it, see refillAt) the next one takes the rest, so a backlog still runs on
 * every worker. A worker whose running task has run past PIPELINE_BUDGET_MS is not packed
 * onto: that task may be turning out long, and what would queue behind it goes to the
 * least loaded worker, as when spreading.
 */
const PACK_BELOW_MS = 0.05;

/**
 * Whether a worker is a better choice than the best so far: when packing, one running
 * tiny tasks now (`packed`) over one that is not, then the busier; otherwise the less
 * loaded.
 */
function better(packed: boolean, load: number, bestPacked: boolean, bestLoad: number): boolean {
  if (packed !== bestPacked) return packed;
  return packed ? load > bestLoad : load < bestLoad;
}
/** Whether a worker may be packed onto: idle, or its running task not past PIPELINE_BUDGET_MS. */
function runningTinyTasks(running: Job | undefined, now: number): boolean {
  return running === undefined || now - running.startedAt < PIPELINE_BUDGET_MS;
}

/**
 * A running task that has run this many times the average (and LONG_TASK_MS at least)
 * has turned out long: it takes no task behind it, and the one it holds is taken back
 * for a worker that will be free sooner. Three times: tasks of one size never reach it.
 */
const LONG_FACTOR = 3;

export interface SchedulerOptions {
  /** How many tasks a child may hold at once (1: one at a time, none held ahead; 2: the next; more: short tasks). */
  maxPipeline: number;
  /** A worker due for recycling after this many tasks is never handed more (0: no limit). */
  maxTasksPerWorker: number;
  /** The functions' own concurrency and rate limits (none when absent). */
  limits?: FuncLimits;
  /** A task was held back by its function's limit, for the first time of each kind. */
  onHeldBack?: (func: string, limit: LimitKind) => void;
  /** Dispatch again in `ms`: a task waits for its function's rate to allow a start. */
  wakeIn?: (ms: number) => void;
  /**
   * The longest a task may wait here for its function's limit before it goes back to the
   * broker (through a delay queue) instead: a delivery held longer would meet the broker's
   * consumer timeout. Default: no bound.
   */
  maxHeldBackMs?: number;
}

/** Which limits a job has been held back by already (counted once each). */
const HELD: Record<LimitKind, number> = { concurrency: 1, rate: 2 };

export class Scheduler {
  readonly #opts: SchedulerOptions;
  #queue: Job[] = [];
  /** Moving average of task run times, which decides whether to pipeline. */
  #averageMs: number | undefined;
  /** The last dispatch passed tasks over: they wait for a limit or a reload, not for a worker. */
  #passedOver = false;

  constructor(opts: SchedulerOptions) {
    this.#opts = opts;
  }

  /** Tasks waiting in the master. */
  get queued(): number {
    return this.#queue.length;
  }

  /**
   * Tasks wait here, and only for a worker to be free (none was passed over for its
   * function's limit or a reload): the broker's next delivery would only join them.
   */
  get waitingForWorker(): boolean {
    return this.#queue.length > 0 && !this.#passedOver;
  }

  get averageMs(): number | undefined {
    return this.#averageMs;
  }

  /**
   * Queues a task behind those of its priority or higher: the queue runs from the highest
   * priority down, in arrival order within one (most often all 0: a push at the end).
   */
  push(job: Job): void {
    const queue = this.#queue;
    const last = queue[queue.length - 1];
    if (last === undefined || last.priority >= job.priority) {
      queue.push(job);
      return;
    }
    let lo = 0;
    let hi = queue.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((queue[mid] as Job).priority >= job.priority) lo = mid + 1;
      else hi = mid;
    }
    queue.splice(lo, 0, job);
  }

  /** Tasks a worker held and never started go back to the front of their priority, in order. */
  requeue(jobs: Job[]): void {
    if (jobs.length === 0) return;
    const queue = this.#queue;
    for (let i = jobs.length - 1; i >= 0; i--) {
      const job = jobs[i] as Job;
      job.releasePlace();
      let at = 0;
      while (at < queue.length && (queue[at] as Job).priority > job.priority) at++;
      queue.splice(at, 0, job);
    }
  }

  /** Takes a waiting task out of the queue (a cancel); whether it was there. */
  remove(match: (job: Job) => boolean): Job | undefined {
    const at = this.#queue.findIndex(match);
    if (at === -1) return undefined;
    return this.#queue.splice(at, 1)[0];
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

  /** Ends every waiting task unrun (the drain): given back, or cancelled if an operator cancelled it. */
  endAllUnrun(reason: string): void {
    for (const job of this.#queue.splice(0)) job.endUnrun(reason);
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
    const max = this.#opts.maxPipeline;
    const next = Math.min(2, max); // the running task and the next
    if (this.#averageMs === undefined) return next;
    const fits = Math.floor(PIPELINE_BUDGET_MS / Math.max(this.#averageMs, 0.001));
    return Math.max(next, Math.min(max, fits));
  }

  /** How long a running task may have run and not have turned out long (LONG_FACTOR). */
  #longMs(): number {
    return Math.max(LONG_TASK_MS, LONG_FACTOR * (this.#averageMs ?? 0));
  }

  /**
   * Hands waiting tasks to workers that can take them: the least loaded first (tiny tasks:
   * the busiest running tiny tasks, PACK_BELOW_MS), and only
   * workers whose code exports the task's func while one does (during a rolling reload,
   * old and new code run side by side). Whether anything was handed over.
   */
  dispatch(workers: Iterable<SchedulerSlot>): boolean {
    const queue = this.#queue;
    const now = performance.now();
    const longMs = this.#longMs();
    // Before anything is handed: a worker about to be topped up with newer tasks is the
    // one that could start a task held behind a long one sooner.
    this.#rebalance(workers, now, longMs);
    if (queue.length === 0) return false;
    const depth = this.#depth();
    const maxTasks = this.#opts.maxTasksPerWorker;
    // A pipelining worker is topped up once it has run down to half its depth, not after
    // every task: one message then carries many tasks instead of one each.
    const refillAt = Math.floor(depth / 2);
    const pack = this.#averageMs !== undefined && this.#averageMs < PACK_BELOW_MS;
    const batches = new Map<SchedulerSlot, Job[]>();
    /**
     * Tasks passed over: the workers whose code has their func are full (a reload), or
     * their function is at its concurrency or rate limit.
     */
    let passedOver: Job[] | undefined;
    const limits = this.#opts.limits?.active === true ? this.#opts.limits : undefined;
    const maxHeldBackMs = this.#opts.maxHeldBackMs ?? Number.POSITIVE_INFINITY;
    let rateWaitMs = Number.POSITIVE_INFINITY;
    while (queue.length > 0) {
      // Look before taking: when nobody can take anything, the queue is left as it is.
      const job = queue[0] as Job;
      // Its channel closed (given back), or an operator cancelled it (ended cancelled).
      if (job.abandoned || job.cancelled) {
        queue.shift();
        job.endUnrun('its channel closed before it started');
        continue;
      }
      const func = job.request.func;
      // A limited function's task goes only to a worker that holds nothing, so that it
      // starts when it is counted (never queued behind a task that turns out long, while
      // another worker idles and its function's place is taken).
      const limited = limits?.has(func) === true;
      if (limits !== undefined && limited) {
        const held = limits.blocked(func, now);
        if (held !== undefined) {
          this.#heldBack(job, held);
          // Its wait for the limit counts from the first time it was held back: no clock
          // read for every task, only for those that wait.
          if (job.queuedAt === 0) job.queuedAt = now;
          const waitedMs = now - job.queuedAt;
          const rateMs = held === 'rate' ? limits.rateWaitMs(func, now) : 0;
          queue.shift();
          if (waitedMs >= maxHeldBackMs) {
            // Back to the broker, to come again when the limit may have room.
            job.end({
              outcome: 'returned',
              reason: `held back by its function's ${held} limit for ${Math.round(waitedMs / 1000)} s`,
              delayMs: Math.max(1_000, rateMs),
            });
            continue;
          }
          rateWaitMs = Math.min(
            rateWaitMs,
            held === 'rate' ? rateMs : Number.POSITIVE_INFINITY,
            maxHeldBackMs - waitedMs,
          );
          passedOver ??= [];
          passedOver.push(job);
          continue;
        }
      }
      let best: SchedulerSlot | undefined;
      let bestLoad = 0;
      let bestPacked = false;
      let fallback: SchedulerSlot | undefined;
      let fallbackLoad = 0;
      let anyKnows = false;
      for (const w of workers) {
        const knows = w.funcs.has(func);
        if (knows && w.isUp) anyKnows = true;
        const planned = batches.get(w)?.length ?? 0;
        if (limited && w.held + planned > 0) continue;
        if (planned === 0 && w.held > refillAt) continue;
        if (!w.canTake(planned, depth, now, maxTasks, longMs)) continue;
        const load = w.held + planned;
        const packed = pack && runningTinyTasks(w.running, now);
        if (knows && (best === undefined || better(packed, load, bestPacked, bestLoad))) {
          best = w;
          bestLoad = load;
          bestPacked = packed;
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
      if (limited) job.place = (limits as FuncLimits).take(func, now);
      const batch = batches.get(best);
      if (batch === undefined) batches.set(best, [job]);
      else batch.push(job);
    }
    this.#passedOver = passedOver !== undefined;
    if (passedOver !== undefined) queue.unshift(...passedOver);
    if (rateWaitMs !== Number.POSITIVE_INFINITY) this.#opts.wakeIn?.(Math.max(1, Math.ceil(rateWaitMs)));
    for (const [w, jobs] of batches) w.hand(jobs);
    return batches.size > 0;
  }

  #heldBack(job: Job, limit: LimitKind): void {
    const bit = HELD[limit];
    if ((job.heldBack & bit) !== 0) return;
    job.heldBack |= bit;
    this.#opts.onHeldBack?.(job.request.func, limit);
  }

  /**
   * Tasks held behind one that has turned out long are taken back (to the front of the
   * queue) when another worker could start them sooner: one that idles, or one that holds
   * only a task that has not turned out long. Checked at every dispatch, before anything
   * is handed, not only when the queue is empty: a worker kept busy by newer tasks never
   * idles, and a task held behind an hour-long one must not wait the hour while those
   * newer tasks run.
   */
  #rebalance(workers: Iterable<SchedulerSlot>, now: number, longMs: number): void {
    let sooner = false;
    for (const w of workers) {
      if (!w.isUp || !w.isLive) continue; // up, and not on its way out
      const running = w.running;
      if (running === undefined || (w.held === 1 && now - running.startedAt < longMs)) {
        sooner = true;
        break;
      }
    }
    if (!sooner) return;
    for (const w of workers) {
      const running = w.running;
      if (w.held > 1 && running !== undefined && now - running.startedAt >= longMs) w.takeBack();
    }
  }
}
