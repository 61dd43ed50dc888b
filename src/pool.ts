// The worker pool (SPEC §3): a small facade over the Supervisor (which workers exist:
// spawn, resize, reload, recycle, boot backoff, exits), the Scheduler (which task goes
// where: queue, pipelining, give-back) and one PoolWorker per slot (its process, its
// tasks, its deadlines). The master never runs user code; every task's result is given
// exactly once (pool-job.ts), whatever the workers do.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { ServiceError } from './errors.ts';
import type { WorkerStatus } from './http.ts';
import { Job, type TaskRequest, type TaskResult } from './pool-job.ts';
import { Scheduler } from './scheduler.ts';
import { type RestartReason, Supervisor } from './supervisor.ts';

export type { TaskRequest, TaskResult } from './pool-job.ts';
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
  /** How many short tasks a child may hold at once (1: one at a time, no pipelining). */
  maxPipeline?: number;
  /** How long a child may take to load the module and say ready. */
  bootTimeoutMs?: number;
  /** After start-up, this many boot failures in a row make the pool give up ('fatal'). */
  maxBootFailures?: number;
  childScript?: string;
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
  fatal: [err: ServiceError];
  change: [];
};

export class WorkerPool extends EventEmitter<PoolEvents> {
  readonly #supervisor: Supervisor;
  readonly #scheduler: Scheduler;
  #nextTaskId = 1;
  #dispatchQueued = false;
  #funcs: ReadonlySet<string> = new Set();
  #funcsAt = -1;

  constructor(opts: PoolOptions) {
    super();
    const log = opts.logger.child({ component: 'pool' });
    this.#scheduler = new Scheduler({
      maxPipeline: opts.maxPipeline ?? 64,
      maxTasksPerWorker: opts.maxTasksPerWorker ?? 0,
    });
    this.#supervisor = new Supervisor({
      size: opts.size,
      moduleUrl: opts.moduleUrl,
      taskTimeoutMs: opts.taskTimeoutMs,
      killGraceMs: opts.killGraceMs ?? 0,
      maxTasksPerWorker: opts.maxTasksPerWorker ?? 0,
      maxWorkerMemoryBytes: opts.maxWorkerMemoryBytes ?? 0,
      bootTimeoutMs: opts.bootTimeoutMs ?? Math.max(30_000, opts.taskTimeoutMs),
      maxBootFailures: opts.maxBootFailures ?? 5,
      childScript: opts.childScript,
      logger: log,
    });
    const supervisor = this.#supervisor;
    supervisor.on('restart', (reason) => this.emit('restart', reason));
    supervisor.on('fatal', (err) => this.emit('fatal', err));
    supervisor.on('ran', (ms) => this.#scheduler.recordRun(ms));
    supervisor.on('returned', (jobs) => {
      if (supervisor.closing) for (const job of jobs) job.giveBack('not started before shutdown');
      else this.#scheduler.requeue(jobs);
      this.#dispatch();
    });
    supervisor.on('change', () => {
      this.#dispatch();
      this.emit('change');
    });
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
  run(request: TaskRequest): Promise<TaskResult> {
    if (this.#supervisor.closing)
      return Promise.resolve({ outcome: 'returned', reason: 'the pool is closing' });
    return new Promise((resolve) => {
      this.#scheduler.push(new Job(this.#nextTaskId++, request, resolve));
      // Deliveries of one socket read arrive in one turn: hand them over together.
      if (!this.#dispatchQueued) {
        this.#dispatchQueued = true;
        queueMicrotask(() => {
          this.#dispatchQueued = false;
          this.#dispatch();
        });
      }
    });
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
   * The drain: queued tasks are given back at once, running ones get until the deadline
   * to finish (then they are killed and given back), and then every child is stopped.
   */
  async close(graceMs: number): Promise<void> {
    const workers = this.#supervisor.workers;
    const closing = this.#supervisor.close(graceMs, () => [...workers].some((w) => w.held > 0));
    this.#scheduler.giveBackAll('not started before shutdown');
    for (const w of workers) w.takeBack();
    await closing;
  }

  #dispatch(): void {
    if (this.#supervisor.closing) return;
    this.#scheduler.dispatch(this.#supervisor.workers);
  }
}
