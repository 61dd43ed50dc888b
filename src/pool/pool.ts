// The worker pool (docs/architecture.md): a small facade over the Supervisor (which workers exist:
// spawn, resize, reload, recycle, boot backoff, exits), the Scheduler (which task goes
// where: queue, pipelining, give-back) and one Slot per slot (its process, its
// tasks, its deadlines). The master never runs user code; every task's result is given
// exactly once (pool-job.ts), whatever the workers do.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { ServiceError } from '../errors.ts';
import { formatRateLimit, type TaskLimits } from '../ipc/task-options.ts';
import { FuncLimits, type LimitKind } from './func-limits.ts';
import { Job, type JobResult, type TaskRequest } from './job.ts';
import { Scheduler } from './scheduler.ts';
import type { SlotState } from './slot.ts';
import { type RestartReason, Supervisor } from './supervisor.ts';

export type { LimitKind } from './func-limits.ts';
export type { JobResult, TaskRequest } from './job.ts';
export type { RestartReason } from './supervisor.ts';

export interface PoolOptions {
  size: number;
  moduleUrl: string;
  taskTimeoutMs: number;
  logger: Logger;
  /** The soft time limit: after the AbortSignal fires, how long before SIGKILL (0: at once). */
  killGraceMs?: number;
  /** Replace a worker after this many tasks (0: never). */
  maxTasksPerWorker?: number;
  /** Replace a worker whose RSS, read after a task, is over this (0: never). */
  maxWorkerMemoryBytes?: number;
  /** The largest result, in bytes of JSON, a task may return for a reply (default 1 MiB). */
  maxResultBytes?: number;
  /** How many short tasks a child may hold at once (1: one at a time, no pipelining). */
  maxPipeline?: number;
  /** How long a child may take to load the module and say ready. */
  bootTimeoutMs?: number;
  /** After start-up, this many boot failures in a row make the pool give up ('fatal'). */
  maxBootFailures?: number;
  /** The longest a task waits for its function's limit before it goes back (see SchedulerOptions). */
  maxHeldBackMs?: number;
}

/** One worker as GET /status shows it. */
export interface WorkerStatus {
  pid: number | undefined;
  state: SlotState;
  /** The func it runs now, when busy. */
  func: string | undefined;
  /** How long the current task has run, when busy. */
  runningForMs: number | undefined;
  tasksDone: number;
  /** The tasks handed to it: the running one, and those it holds to start next. */
  held: number;
  /** Resident memory of the worker process, when known (read between tasks). */
  rssBytes: number | undefined;
}

/** A function's own options and what it runs now under them (GET /status). */
export interface FuncStatus {
  timeoutMs?: number;
  killGraceMs?: number;
  maxRetries?: number;
  concurrency?: number;
  rateLimit?: string;
  /** Runs of it holding a place under its concurrency or rate limit now. */
  running: number;
}

export interface PoolStats {
  desired: number;
  starting: number;
  idle: number;
  busy: number;
  /** Tasks waiting: in the master's queue or handed to a child and not started. */
  queued: number;
  /** Genuine boot failures in a row: workers failing to start. */
  bootFailures: number;
}

type PoolEvents = {
  restart: [reason: RestartReason];
  /** A task waited because its function was at its own limit (once per task and limit). */
  heldBack: [func: string, limit: LimitKind];
  /** The newest task code's options changed (a reload that is up). */
  limits: [limits: Readonly<Record<string, TaskLimits>>];
  fatal: [err: ServiceError];
  change: [];
};

/**
 * The most tasks a child holds at once by default: reached only by tasks of 16 µs or less
 * on average (the scheduler's 2 ms of work bounds the rest). Each hand-over costs the
 * master some 30 µs whatever it carries (the IPC write and the child's wake-up), and at
 * 64 a tiny-task backlog needed one for every 42 tasks; 128 ran it 4% faster in four
 * ABBA pairs of the bench, 256 no faster again (docs/benchmarks.md, eighteenth pass).
 */
const MAX_PIPELINE = 128;

export class Pool extends EventEmitter<PoolEvents> {
  readonly #supervisor: Supervisor;
  readonly #scheduler: Scheduler;
  #nextTaskId = 1;
  #dispatchQueued = false;
  #funcs: ReadonlySet<string> = new Set();
  #funcsAt = -1;
  #limits: Readonly<Record<string, TaskLimits>> = {};
  #limitsAt = -1;
  readonly #funcLimits = new FuncLimits();
  /** The drain has begun (stopStarting): no task starts any more. */
  #stopped = false;
  #wake: NodeJS.Timeout | undefined;
  #wakeAt = Number.POSITIVE_INFINITY;

  constructor(opts: PoolOptions) {
    super();
    const log = opts.logger.child({ component: 'pool' });
    this.#scheduler = new Scheduler({
      maxPipeline: opts.maxPipeline ?? MAX_PIPELINE,
      maxTasksPerWorker: opts.maxTasksPerWorker ?? 0,
      limits: this.#funcLimits,
      onHeldBack: (func, limit) => this.emit('heldBack', func, limit),
      wakeIn: (ms) => this.#wakeIn(ms),
      ...(opts.maxHeldBackMs === undefined ? {} : { maxHeldBackMs: opts.maxHeldBackMs }),
    });
    this.#supervisor = new Supervisor({
      size: opts.size,
      moduleUrl: opts.moduleUrl,
      taskTimeoutMs: opts.taskTimeoutMs,
      killGraceMs: opts.killGraceMs ?? 0,
      maxTasksPerWorker: opts.maxTasksPerWorker ?? 0,
      maxWorkerMemoryBytes: opts.maxWorkerMemoryBytes ?? 0,
      maxResultBytes: opts.maxResultBytes ?? 1024 * 1024,
      bootTimeoutMs: opts.bootTimeoutMs ?? Math.max(30_000, opts.taskTimeoutMs),
      maxBootFailures: opts.maxBootFailures ?? 5,
      logger: log,
    });
    const supervisor = this.#supervisor;
    supervisor.on('restart', (reason) => this.emit('restart', reason));
    supervisor.on('fatal', (err) => this.emit('fatal', err));
    supervisor.on('ran', (ms) => this.#scheduler.recordRun(ms));
    supervisor.on('returned', (jobs) => {
      if (supervisor.closing) for (const job of jobs) job.endUnrun('not started before shutdown');
      else this.#scheduler.requeue(jobs);
      this.#dispatch();
    });
    supervisor.on('change', () => {
      // Only when who is up changed (a ready, an exit): 'change' comes after every task too.
      if (this.#supervisor.roster !== this.#limitsAt) this.#funcLimits.configure(this.limits);
      this.#dispatch();
      this.emit('change');
    });
  }

  /**
   * The options the task code declares, by function (README "Per-task options"): those
   * of the newest code that is up, so that a reload applies new options to runs that start
   * from then on (a slot applies its own code's time limit to what it runs).
   */
  get limits(): Readonly<Record<string, TaskLimits>> {
    const roster = this.#supervisor.roster;
    if (roster === this.#limitsAt) return this.#limits;
    let newest: { generation: number; limits: Readonly<Record<string, TaskLimits>> } | undefined;
    for (const w of this.#supervisor.workers)
      if (w.isUp && (newest === undefined || w.generation > newest.generation))
        newest = { generation: w.generation, limits: w.limits };
    this.#limitsAt = roster;
    if (newest !== undefined && newest.limits !== this.#limits) {
      this.#limits = newest.limits;
      this.emit('limits', newest.limits);
    }
    return this.#limits;
  }

  /**
   * Cancels the task `match` finds (an operator's cancel): one waiting in the master ends
   * `cancelled` at once, unrun; one handed to a worker and not started is asked back and
   * ends the same way; the running one gets its AbortSignal, then the kill after its grace.
   */
  cancel(match: (request: TaskRequest) => boolean): 'running' | 'queued' | undefined {
    // Every match: two deliveries of one message (a producer that published again) both end.
    let found: 'running' | 'queued' | undefined;
    for (let waiting = this.#scheduler.remove((job) => match(job.request)); waiting !== undefined; ) {
      waiting.endCancelled();
      found = 'queued';
      waiting = this.#scheduler.remove((job) => match(job.request));
    }
    const better = (here: 'running' | 'queued' | undefined) => {
      if (here === 'running' || (here === 'queued' && found === undefined)) found = here;
    };
    for (const w of this.#supervisor.workers) {
      let here = w.cancel((job) => !job.cancelled && match(job.request));
      if (here === undefined) better(w.cancel((job) => match(job.request))); // cancelled before: said again
      for (; here !== undefined; here = w.cancel((job) => !job.cancelled && match(job.request))) better(here);
    }
    return found;
  }

  /** The functions that declare options of their own, with their runs under them now. */
  funcStatus(): Record<string, FuncStatus> {
    const funcs: Record<string, FuncStatus> = {};
    for (const [func, limits] of Object.entries(this.limits)) {
      const { timeoutMs, killGraceMs, maxRetries, concurrency, rate } = limits;
      funcs[func] = {
        ...(timeoutMs === undefined ? {} : { timeoutMs }),
        ...(killGraceMs === undefined ? {} : { killGraceMs }),
        ...(maxRetries === undefined ? {} : { maxRetries }),
        ...(concurrency === undefined ? {} : { concurrency }),
        ...(rate === undefined ? {} : { rateLimit: formatRateLimit(rate) }),
        running: this.#funcLimits.running(func),
      };
    }
    return funcs;
  }

  /** Dispatch again once a function's rate allows another start. */
  #wakeIn(ms: number): void {
    const at = performance.now() + ms;
    if (this.#wake !== undefined && this.#wakeAt <= at) return;
    clearTimeout(this.#wake);
    this.#wakeAt = at;
    this.#wake = setTimeout(() => {
      this.#wake = undefined;
      this.#wakeAt = Number.POSITIVE_INFINITY;
      this.#dispatch();
    }, ms);
  }

  /**
   * The names the task code of the workers that are up exports as callable (of every
   * generation during a reload). While none is up (all being replaced), the last known.
   */
  get funcs(): ReadonlySet<string> {
    const roster = this.#supervisor.roster;
    if (roster === this.#funcsAt) return this.#funcs;
    this.#funcsAt = roster;
    const names = new Set<string>();
    for (const w of this.#supervisor.workers) if (w.isUp) for (const f of w.funcs) names.add(f);
    if (names.size > 0) this.#funcs = names;
    return this.#funcs;
  }

  get size(): number {
    return this.#supervisor.desired;
  }

  /** The moving average of task run times, as the children measure them (undefined until one finished). */
  get averageTaskMs(): number | undefined {
    return this.#scheduler.averageMs;
  }

  async start(): Promise<void> {
    await this.#supervisor.start();
  }

  /** Queues a task; it runs when a worker is free. Resolves with its outcome, never rejects. */
  run(request: TaskRequest): Promise<JobResult> {
    return new Promise((resolve) => this.submit(request, resolve));
  }

  /**
   * Queues a task; `onEnd` is called once with its outcome, from inside whatever ended it
   * (a result read, a timeout, an exit). The dispatcher's way in: a promise and its turn
   * per task were some 3% of the master's CPU for tiny tasks. `onEnd` must not throw.
   */
  submit(request: TaskRequest, onEnd: (result: JobResult) => void): void {
    if (this.#supervisor.closing) {
      // Never from inside the caller's own call.
      queueMicrotask(() => onEnd({ outcome: 'returned', reason: 'the pool is closing' }));
      return;
    }
    this.#scheduler.push(new Job(this.#nextTaskId++, request, onEnd));
    // Deliveries of one socket read arrive in one turn: hand them over together.
    if (!this.#dispatchQueued) {
      this.#dispatchQueued = true;
      queueMicrotask(() => {
        this.#dispatchQueued = false;
        this.#dispatch();
      });
    }
  }

  /** Gives back up to `count` tasks waiting in the master's queue, the newest first: how many. */
  giveBack(count: number): number {
    return this.#scheduler.giveBack(count, 'more was prefetched than the task duration warrants');
  }

  /**
   * Drops every task not started whose delivery is abandoned (its channel closed, so the
   * broker gives the message to the queue again): those waiting here at once, those
   * waiting inside a child once it hands them back.
   */
  dropAbandoned(): number {
    const dropped = this.#scheduler.dropAbandoned();
    for (const w of this.#supervisor.workers) w.takeBack();
    return dropped;
  }

  /** The tasks running in a worker now (the first each slot holds), as they were asked for. */
  running(): TaskRequest[] {
    const requests: TaskRequest[] = [];
    for (const w of this.#supervisor.workers) {
      const job = w.running;
      if (job !== undefined) requests.push(job.request);
    }
    return requests;
  }

  /**
   * Whether the tasks waiting in the master only for a free worker (Scheduler.waitingForWorker)
   * hold at least `workMs` of work for each worker, at the average run time.
   */
  backlogCovers(workMs: number): boolean {
    const scheduler = this.#scheduler;
    const averageMs = scheduler.averageMs;
    if (averageMs === undefined || !scheduler.waitingForWorker) return false;
    return scheduler.queued * averageMs >= workMs * this.#supervisor.desired;
  }

  stats(): PoolStats {
    const stats: PoolStats = {
      desired: this.#supervisor.desired,
      starting: 0,
      idle: 0,
      busy: 0,
      queued: this.#scheduler.queued,
      bootFailures: this.#supervisor.bootFailures,
    };
    for (const w of this.#supervisor.workers) {
      const state = w.state;
      if (state === 'starting') stats.starting++;
      else if (state === 'idle') stats.idle++;
      else if (state === 'busy') stats.busy++;
      stats.queued += Math.max(0, w.held - 1);
    }
    return stats;
  }

  status(): WorkerStatus[] {
    const now = performance.now();
    return [...this.#supervisor.workers].map((w) => {
      const job = w.running;
      return {
        pid: w.pid,
        state: w.state,
        func: job?.request.func,
        runningForMs: job === undefined ? undefined : Math.round(now - job.startedAt),
        tasksDone: w.tasksDone,
        held: w.held,
        rssBytes: w.rssBytes,
      };
    });
  }

  resize(count: number): void {
    this.#supervisor.resize(count);
  }

  /** Rolls every worker onto the task module's current code (see Supervisor.reload). */
  reload(): Promise<void> {
    return this.#supervisor.reload();
  }

  /**
   * The drain's first step, before consuming has stopped: from now no task starts. What a
   * worker holds and has not started is asked back into the master's queue, and what
   * arrives waits there; close() gives all of it back. Before, tasks kept starting while
   * the consumer's cancel went to the broker and back, and ran instead of going back.
   */
  stopStarting(): void {
    this.#stopped = true;
    for (const w of this.#supervisor.workers) w.takeBack();
  }

  /**
   * The drain: queued tasks are given back at once, running ones get until the deadline
   * to finish (then they are killed and given back), and then every child is stopped.
   */
  async close(graceMs: number): Promise<void> {
    clearTimeout(this.#wake);
    this.#wake = undefined;
    const workers = this.#supervisor.workers;
    const closing = this.#supervisor.close(graceMs, () => [...workers].some((w) => w.held > 0));
    this.#scheduler.endAllUnrun('not started before shutdown');
    this.stopStarting();
    await closing;
  }

  #dispatch(): void {
    if (this.#supervisor.closing || this.#stopped) return;
    this.#scheduler.dispatch(this.#supervisor.workers);
  }
}
