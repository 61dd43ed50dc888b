// The worker pool (SPEC §3), after gunicorn's arbiter and BullMQ's child pool: the master
// owns every deadline on a monotonic clock, so a stuck child cannot stop its own kill; a
// child says `ready` before it gets work; a kill is awaited (exit seen) before the slot is
// refilled; deaths are classified (timeout, crash, recycle); children that keep failing
// to boot stop the pool. The pool can be resized, recycles workers by task count or
// memory between tasks, and rolls all workers onto new code (reload) one by one.
//
// Speed: while tasks are short, a child may be handed several at once and runs them in
// order: as many as fit in PIPELINE_BUDGET_MS of work at the average duration (up to
// maxPipeline), so that what waits inside a child stays short whatever the task size.
// The master still times each one, starting its clock when the previous one reports done
// (which is when the child starts it). Tasks handed over but not started are taken back
// (`cancel`) when a worker leaves, when the pool closes, or when another worker sits idle
// behind a task that turned out long.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { type SerializedError, ServiceError } from './errors.ts';
import type { WorkerStatus } from './http.ts';
import type { CancelledMessage, ResultLine, RunTask, TaskOutcome } from './protocol.ts';
import { WorkerProcess } from './worker-process.ts';

export interface TaskRequest {
  func: string;
  args: unknown[];
  kwargs: Record<string, unknown> | undefined;
  messageId: string | undefined;
  redelivered: boolean;
  attempt: number;
  wantResult: boolean;
}

export type TaskResult =
  | { outcome: 'succeeded'; resultJson: string | undefined; durationMs: number }
  | { outcome: 'failed' | 'timeout' | 'crashed'; error: SerializedError; durationMs: number }
  /** Never ran to an end: given back during a drain, so the message goes back to the queue. */
  | { outcome: 'returned'; reason: string };

export type RestartReason = 'timeout' | 'crash' | 'recycle';

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
}

interface Job {
  taskId: number;
  request: TaskRequest;
  resolve: (result: TaskResult) => void;
  startedAt: number;
  timer: NodeJS.Timeout | undefined;
  /** Set once the time limit has passed: whatever the task does next, it is a timeout. */
  timedOut: boolean;
}

type LeaveReason = 'scale' | 'reload' | 'recycle';

type PoolEvents = {
  restart: [reason: RestartReason];
  fatal: [err: ServiceError];
  change: [];
};

/**
 * How much work (at the average task duration) a child may hold beyond the task it runs.
 * Every message to a child is a write that wakes it, which for tiny tasks costs more than
 * the task; a deeper pipeline sends fewer, larger messages. Bounded in time, not count,
 * so that a task handed to a busy child waits at most about this long for its turn.
 */
const PIPELINE_BUDGET_MS = 2;
/** A running task older than this no longer takes tasks behind it, and gives back those it holds when a worker idles. */
const LONG_TASK_MS = 5;

export class WorkerPool extends EventEmitter<PoolEvents> {
  readonly #opts: Required<PoolOptions>;
  readonly #log: Logger;
  readonly #workers = new Set<WorkerProcess>();
  /** Per worker, the tasks handed over: the first runs, the rest wait in the child in order. */
  readonly #inflight = new Map<WorkerProcess, Job[]>();
  /** Workers that take no more work and leave once their tasks are done. */
  readonly #leaving = new Map<WorkerProcess, LeaveReason>();
  /** Workers asked to give back what they have not started, until they answer. */
  readonly #cancelling = new Set<WorkerProcess>();
  /** Workers the master killed, and why: decides how their death is counted. */
  readonly #killed = new Map<WorkerProcess, 'timeout' | 'shutdown'>();
  #queue: Job[] = [];
  #desired: number;
  /** Extra workers allowed while a reload starts a new one before retiring an old one. */
  #surge = 0;
  #funcs: ReadonlySet<string> = new Set();
  #nextTaskId = 1;
  #closing = false;
  #started = false;
  #bootFailures = 0;
  #gaveUp = false;
  #respawnTimer: NodeJS.Timeout | undefined;
  #reloading: Promise<void> | undefined;
  #dispatchQueued = false;
  /** Moving average of task durations, which decides whether to pipeline. */
  #averageMs: number | undefined;

  constructor(opts: PoolOptions) {
    super();
    this.#opts = {
      bootTimeoutMs: Math.max(30_000, opts.taskTimeoutMs),
      maxBootFailures: 5,
      killGraceMs: 0,
      maxTasksPerWorker: 0,
      maxWorkerMemoryBytes: 0,
      maxPipeline: 64,
      childScript: '',
      ...opts,
    };
    this.#desired = opts.size;
    this.#log = opts.logger.child({ component: 'pool' });
  }

  /** The names the task module exports as callable, as its children reported them. */
  get funcs(): ReadonlySet<string> {
    return this.#funcs;
  }

  get size(): number {
    return this.#desired;
  }

  /** The moving average of task run times, as the children measure them (undefined until one finished). */
  get averageTaskMs(): number | undefined {
    return this.#averageMs;
  }

  /**
   * Gives back up to `count` tasks that wait in the master's queue, the newest first:
   * they end as `returned` (their messages go back to the broker). How many it gave back.
   */
  giveBack(count: number): number {
    const jobs = this.#queue.splice(Math.max(0, this.#queue.length - count));
    for (const job of jobs)
      job.resolve({ outcome: 'returned', reason: 'more was prefetched than the task duration warrants' });
    return jobs.length;
  }

  stats(): PoolStats {
    const stats: PoolStats = {
      desired: this.#desired,
      starting: 0,
      idle: 0,
      busy: 0,
      queued: this.#queue.length,
    };
    for (const w of this.#workers) {
      if (w.state === 'starting') stats.starting++;
      else if (w.state === 'idle') stats.idle++;
      else if (w.state === 'busy') stats.busy++;
      stats.queued += Math.max(0, (this.#inflight.get(w)?.length ?? 0) - 1);
    }
    return stats;
  }

  status(): WorkerStatus[] {
    const now = performance.now();
    return [...this.#workers].map((w) => {
      const job = this.#inflight.get(w)?.[0];
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

  /**
   * Starts every child and waits until all are ready. If the task module cannot be
   * loaded, stops them and rejects with ERR_TASK_MODULE: no respawn loop at start-up.
   */
  async start(): Promise<void> {
    const boots: Promise<unknown>[] = [];
    for (let i = 0; i < this.#desired; i++) boots.push(this.#spawn().ready);
    try {
      await Promise.all(boots);
    } catch (err) {
      await this.close(0);
      throw err;
    }
    this.#started = true;
    this.#log.info({ workers: this.#desired, funcs: [...this.#funcs] }, 'workers ready');
  }

  /** Queues a task; it runs when a worker is free. Resolves with its outcome, never rejects. */
  run(request: TaskRequest): Promise<TaskResult> {
    if (this.#closing) return Promise.resolve({ outcome: 'returned', reason: 'the pool is closing' });
    return new Promise((resolve) => {
      this.#queue.push({
        taskId: this.#nextTaskId++,
        request,
        resolve,
        startedAt: 0,
        timer: undefined,
        timedOut: false,
      });
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

  /** Sets the number of workers: new ones start now, surplus ones leave after their task. */
  resize(count: number): void {
    if (!Number.isSafeInteger(count) || count < 1)
      throw new RangeError(`the worker count must be at least 1 (got ${count})`);
    if (this.#closing) throw new ServiceError('ERR_POOL_CLOSED', 'the pool is shutting down');
    if (count === this.#desired) return;
    this.#log.info({ from: this.#desired, to: count }, 'resizing the pool');
    this.#desired = count;
    this.#reconcile();
  }

  /**
   * Replaces every worker with one that loads the task module anew, one at a time: the
   * new one must be ready before an old one leaves (after its current task), so capacity
   * never drops. If the new code cannot load, the reload stops and the old workers stay.
   */
  reload(): Promise<void> {
    this.#reloading ??= this.#roll().finally(() => {
      this.#reloading = undefined;
    });
    return this.#reloading;
  }

  async #roll(): Promise<void> {
    const old = [...this.#workers].filter((w) => this.#isLive(w));
    this.#log.info({ workers: old.length }, 'reloading workers');
    for (const w of old) {
      if (this.#closing) return;
      if (!this.#isLive(w)) continue; // gone meanwhile; its replacement already has the new code
      this.#surge = 1;
      const fresh = this.#spawn({ forReload: true });
      try {
        await fresh.ready;
      } catch (err) {
        this.#log.error({ err }, 'reload stopped: the new task module does not start; the old workers stay');
        await fresh.exited;
        return;
      } finally {
        this.#surge = 0;
      }
      this.#leave(w, 'reload');
    }
    this.#log.info('reload done');
  }

  /**
   * The drain: queued tasks are given back at once, running ones get until the deadline
   * to finish (then they are killed and given back), and then every child is stopped.
   */
  async close(graceMs: number): Promise<void> {
    this.#closing = true;
    clearTimeout(this.#respawnTimer);
    for (const job of this.#queue.splice(0))
      job.resolve({ outcome: 'returned', reason: 'not started before shutdown' });
    for (const w of this.#workers) this.#takeBackWaiting(w);
    await this.#waitForBusy(graceMs);
    for (const w of this.#workers) {
      if (w.state === 'busy') {
        this.#killed.set(w, 'shutdown');
        w.kill();
      } else if (w.state !== 'stopping') {
        // An idle child exits on disconnect; a starting one is killed (it may hang in its import).
        if (w.state === 'starting') w.kill();
        else w.retire();
      }
    }
    const exits = [...this.#workers].map((w) => w.exited);
    const stragglers = setTimeout(() => {
      for (const w of this.#workers) w.kill();
    }, 5_000);
    await Promise.all(exits);
    clearTimeout(stragglers);
    this.emit('change');
  }

  #waitForBusy(graceMs: number): Promise<void> {
    const busy = () => [...this.#workers].some((w) => w.state === 'busy');
    if (!busy() || graceMs <= 0) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (busy()) return;
        clearTimeout(timer);
        this.off('change', done);
        resolve();
      };
      const timer = setTimeout(() => {
        this.off('change', done);
        resolve();
      }, graceMs);
      this.on('change', done);
    });
  }

  /** Counted towards the pool's size: not stopping, and not on its way out. */
  #isLive(w: WorkerProcess): boolean {
    return this.#workers.has(w) && w.state !== 'stopping' && !this.#leaving.has(w);
  }

  #depth(): number {
    if (this.#averageMs === undefined) return 1;
    const fits = Math.floor(PIPELINE_BUDGET_MS / Math.max(this.#averageMs, 0.001));
    return Math.max(1, Math.min(this.#opts.maxPipeline, fits));
  }

  /** Whether `w` may take one more task now. */
  #canTake(w: WorkerProcess, depth: number, now: number): boolean {
    if ((w.state !== 'idle' && w.state !== 'busy') || this.#leaving.has(w) || this.#cancelling.has(w))
      return false;
    const jobs = this.#inflight.get(w) ?? [];
    // A worker due for recycling after N tasks is never handed more than N.
    const budget = this.#opts.maxTasksPerWorker;
    if (budget > 0 && w.tasksDone + jobs.length >= budget) return false;
    if (jobs.length === 0) return true;
    // Never queue behind a task that has turned out long.
    return jobs.length < depth && now - (jobs[0] as Job).startedAt < LONG_TASK_MS;
  }

  #dispatch(): void {
    if (this.#queue.length === 0) {
      this.#rebalance();
      return;
    }
    const depth = this.#depth();
    const now = performance.now();
    // A pipelining worker is topped up once it has run down to half its depth, not after
    // every task: one message then carries many tasks instead of one each.
    const refillAt = Math.floor(depth / 2);
    const batches = new Map<WorkerProcess, RunTask[]>();
    while (this.#queue.length > 0) {
      // The least loaded worker that can take one more: idle ones first.
      let best: WorkerProcess | undefined;
      for (const w of this.#workers) {
        if (!this.#canTake(w, depth, now)) continue;
        if (!batches.has(w) && (this.#inflight.get(w)?.length ?? 0) > refillAt) continue;
        if (
          best === undefined ||
          (this.#inflight.get(w)?.length ?? 0) < (this.#inflight.get(best)?.length ?? 0)
        )
          best = w;
      }
      if (best === undefined) break;
      const job = this.#queue.shift() as Job;
      const jobs = this.#inflight.get(best) ?? [];
      this.#inflight.set(best, jobs);
      jobs.push(job);
      if (jobs.length === 1) this.#startClock(best, job);
      const { request } = job;
      const batch = batches.get(best) ?? [];
      batches.set(best, batch);
      batch.push({
        taskId: job.taskId,
        func: request.func,
        args: request.args,
        kwargs: request.kwargs,
        messageId: request.messageId,
        redelivered: request.redelivered,
        attempt: request.attempt,
        wantResult: request.wantResult,
      });
    }
    const rssEachTask = this.#opts.maxWorkerMemoryBytes > 0;
    for (const [w, tasks] of batches)
      w.send({ type: 'run', tasks, timeoutMs: this.#opts.taskTimeoutMs, rssEachTask });
    if (batches.size > 0) this.emit('change');
  }

  /** A worker idles with nothing queued while another holds tasks behind a long one: take them back. */
  #rebalance(): void {
    if (![...this.#workers].some((w) => w.state === 'idle' && !this.#leaving.has(w))) return;
    const now = performance.now();
    for (const w of this.#workers) {
      const jobs = this.#inflight.get(w);
      if (jobs !== undefined && jobs.length > 1 && now - (jobs[0] as Job).startedAt >= LONG_TASK_MS) {
        this.#takeBackWaiting(w);
      }
    }
  }

  /** Asks a child for the tasks it holds and has not started (answered by `cancelled`). */
  #takeBackWaiting(w: WorkerProcess): void {
    if ((this.#inflight.get(w)?.length ?? 0) <= 1 || this.#cancelling.has(w)) return;
    this.#cancelling.add(w);
    w.send({ type: 'cancel' });
  }

  #startClock(w: WorkerProcess, job: Job): void {
    w.state = 'busy';
    job.startedAt = performance.now();
    // The deadline is the master's: a timer on the monotonic clock, whatever the child does.
    job.timer = setTimeout(() => this.#timeLimit(w, job), this.#opts.taskTimeoutMs);
  }

  #timeoutError(soft: boolean): SerializedError {
    const seconds = this.#opts.taskTimeoutMs / 1000;
    return {
      name: 'TimeoutError',
      message: soft
        ? `task ran past the worker timeout of ${seconds} s and stopped on its AbortSignal`
        : `task ran past the worker timeout of ${seconds} s`,
      code: 'ERR_TASK_TIMEOUT',
    };
  }

  /** The time limit: abort and allow the grace, or kill now. */
  #timeLimit(w: WorkerProcess, job: Job): void {
    if (this.#inflight.get(w)?.[0] !== job) return;
    job.timedOut = true;
    const fields = { pid: w.pid, taskId: job.taskId, func: job.request.func };
    if (this.#opts.killGraceMs > 0) {
      this.#log.warn(
        { ...fields, killGraceMs: this.#opts.killGraceMs },
        'task reached its time limit; aborting it',
      );
      w.send({ type: 'abort', taskId: job.taskId, reason: 'the task reached its time limit' });
      this.#takeBackWaiting(w);
      job.timer = setTimeout(() => this.#kill(w, job), this.#opts.killGraceMs);
      return;
    }
    this.#kill(w, job);
  }

  #kill(w: WorkerProcess, job: Job): void {
    const jobs = this.#inflight.get(w);
    if (jobs?.[0] !== job) return;
    this.#log.warn(
      { pid: w.pid, taskId: job.taskId, func: job.request.func },
      'task timed out; killing its worker',
    );
    this.#killed.set(w, 'timeout');
    w.state = 'stopping';
    w.kill();
    this.#inflight.delete(w);
    clearTimeout(job.timer);
    job.resolve({
      outcome: 'timeout',
      error: this.#timeoutError(false),
      durationMs: performance.now() - job.startedAt,
    });
    this.#requeue(jobs.slice(1));
  }

  /** Tasks a worker held and never started go back to the front of the queue, in order. */
  #requeue(jobs: Job[]): void {
    if (jobs.length === 0) return;
    if (this.#closing) {
      for (const job of jobs) job.resolve({ outcome: 'returned', reason: 'not started before shutdown' });
      return;
    }
    this.#queue = [...jobs, ...this.#queue];
    this.#dispatch();
  }

  #resultOf(job: Job, outcome: TaskOutcome, durationMs: number): TaskResult {
    if (job.timedOut) return { outcome: 'timeout', error: this.#timeoutError(true), durationMs };
    if (outcome.ok) return { outcome: 'succeeded', resultJson: outcome.resultJson, durationMs };
    return { outcome: 'failed', error: outcome.error, durationMs };
  }

  #onDone(w: WorkerProcess, results: ResultLine[]): void {
    const jobs = this.#inflight.get(w);
    if (jobs === undefined || this.#killed.has(w)) return;
    for (const outcome of results) {
      const job = jobs[0];
      if (job === undefined || job.taskId !== outcome.taskId) {
        this.#log.error(
          { pid: w.pid, taskId: outcome.taskId },
          'a worker reported a task it was not running',
        );
        continue;
      }
      jobs.shift();
      const durationMs = performance.now() - job.startedAt;
      // The child's own measure: results read together would otherwise look like one
      // long task and several of no length, and the average would understate them.
      const ranMs = outcome.ranMs ?? durationMs;
      this.#averageMs = this.#averageMs === undefined ? ranMs : this.#averageMs * 0.8 + ranMs * 0.2;
      w.tasksDone++;
      clearTimeout(job.timer);
      job.resolve(this.#resultOf(job, outcome, durationMs));
      // The child starts the next one as it reports this one: so does its clock.
      const next = jobs[0];
      if (next !== undefined) this.#startClock(w, next);
    }
    if (jobs.length === 0) {
      this.#inflight.delete(w);
      w.state = 'idle';
    }
    this.#afterTasks(w);
    this.emit('change');
    this.#dispatch();
  }

  #onCancelled(w: WorkerProcess, msg: CancelledMessage): void {
    this.#cancelling.delete(w);
    const jobs = this.#inflight.get(w);
    if (jobs === undefined) return;
    const ids = new Set(msg.taskIds);
    const back = jobs.filter((j) => ids.has(j.taskId));
    this.#inflight.set(
      w,
      jobs.filter((j) => !ids.has(j.taskId)),
    );
    if (this.#inflight.get(w)?.length === 0) {
      this.#inflight.delete(w);
      w.state = 'idle';
    }
    this.#afterTasks(w);
    this.emit('change');
    this.#requeue(back);
    this.#dispatch();
  }

  /** Between tasks: leave if on the way out and done, or if worn out (task count, memory). */
  #afterTasks(w: WorkerProcess): void {
    if (!this.#leaving.has(w)) {
      const { maxTasksPerWorker, maxWorkerMemoryBytes } = this.#opts;
      const tooMany = maxTasksPerWorker > 0 && w.tasksDone >= maxTasksPerWorker;
      const tooBig = maxWorkerMemoryBytes > 0 && (w.rssBytes ?? 0) > maxWorkerMemoryBytes;
      if (!tooMany && !tooBig) return;
      this.#log.info({ pid: w.pid, tasksDone: w.tasksDone, rssBytes: w.rssBytes }, 'recycling a worker');
      this.emit('restart', 'recycle');
      this.#leave(w, 'recycle');
      this.#reconcile();
      return;
    }
    if (w.state === 'idle') {
      this.#leaving.delete(w);
      w.retire();
    }
  }

  /** Sends a worker away: now if idle, after its running task if busy (what it holds goes back). */
  #leave(w: WorkerProcess, why: LeaveReason): void {
    if (w.state === 'starting') {
      w.kill();
      return;
    }
    if (w.state === 'idle') {
      w.retire();
      return;
    }
    this.#leaving.set(w, why);
    this.#takeBackWaiting(w);
  }

  /** Forks one child; its boot failure after start-up backs off, and enough in a row stop the pool. */
  #spawn(opts: { forReload?: boolean } = {}): WorkerProcess {
    const w = new WorkerProcess(
      this.#opts.moduleUrl,
      this.#opts.bootTimeoutMs,
      this.#opts.childScript || undefined,
    );
    this.#workers.add(w);
    w.on('done', (results) => this.#onDone(w, results));
    w.on('cancelled', (msg) => this.#onCancelled(w, msg));
    w.on('exit', (code, signal) => this.#onExit(w, code, signal));
    w.ready.then(
      (funcs) => {
        this.#funcs = new Set(funcs);
        this.#bootFailures = 0;
        if (this.#closing) w.retire();
        this.emit('change');
        this.#reconcile();
        this.#dispatch();
      },
      (err: ServiceError) => {
        if (!this.#started || this.#closing || opts.forReload) return; // start() and reload() report it
        this.#bootFailures++;
        this.#log.error({ err, failures: this.#bootFailures }, 'a replacement worker failed to start');
        if (this.#bootFailures >= this.#opts.maxBootFailures) {
          this.#gaveUp = true;
          const message = `workers failed to start ${this.#bootFailures} times in a row: ${err.message}`;
          this.emit('fatal', new ServiceError('ERR_WORKER_BOOT', message, { cause: err }));
          return;
        }
        // Refilled after a pause that grows with each failure, not in a tight loop.
        clearTimeout(this.#respawnTimer);
        this.#respawnTimer = setTimeout(
          () => {
            this.#respawnTimer = undefined;
            this.#reconcile();
          },
          Math.min(10_000, 100 * 2 ** this.#bootFailures),
        );
      },
    );
    this.emit('change');
    return w;
  }

  #onExit(w: WorkerProcess, code: number | null, signal: NodeJS.Signals | null): void {
    const jobs = this.#inflight.get(w) ?? [];
    const killed = this.#killed.get(w);
    const [running, ...waiting] = jobs;
    if (running !== undefined) {
      clearTimeout(running.timer);
      if (killed === 'shutdown') {
        running.resolve({ outcome: 'returned', reason: 'still running at the shutdown deadline' });
      } else {
        const how = signal ?? `exit code ${code}`;
        running.resolve({
          outcome: 'crashed',
          error: {
            name: 'WorkerCrashed',
            message: `the worker process died while running the task (${how})`,
            code: 'ERR_WORKER_CRASHED',
          },
          durationMs: performance.now() - running.startedAt,
        });
      }
    }
    const expected = this.#closing || killed !== undefined || w.state === 'stopping';
    this.#workers.delete(w);
    this.#inflight.delete(w);
    this.#killed.delete(w);
    this.#leaving.delete(w);
    this.#cancelling.delete(w);
    w.state = 'stopping';
    if (killed === 'timeout') this.emit('restart', 'timeout');
    else if (!expected) {
      this.#log.error({ pid: w.pid, code, signal, busy: running !== undefined }, 'worker died');
      this.emit('restart', 'crash');
    }
    this.emit('change');
    this.#requeue(waiting);
    // After this turn: a boot failure's own handler runs first and sets the backoff.
    setImmediate(() => this.#reconcile());
  }

  /** Keeps the number of live workers at the size: starts the missing, sends away the surplus. */
  #reconcile(): void {
    if (this.#closing || this.#gaveUp || !this.#started) return;
    const live = [...this.#workers].filter((w) => this.#isLive(w));
    const target = this.#desired + this.#surge;
    if (live.length < target && this.#respawnTimer === undefined) {
      for (let i = live.length; i < target; i++) this.#spawn();
    } else if (live.length > target) {
      // Idle ones first (they leave now), then starting ones, then busy ones (after their task).
      const order = { idle: 0, starting: 1, busy: 2, stopping: 3 } as const;
      const surplus = live.sort((a, b) => order[a.state] - order[b.state]).slice(0, live.length - target);
      for (const w of surplus) this.#leave(w, 'scale');
    }
  }
}
