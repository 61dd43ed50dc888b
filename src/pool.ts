// The worker pool (SPEC §3), after gunicorn's arbiter and BullMQ's child pool: the master
// owns every deadline on a monotonic clock, so a stuck child cannot stop its own kill; a
// child says `ready` before it gets work; a kill is awaited (exit seen) before the slot is
// refilled; deaths are classified (timeout, crash, recycle); children that keep failing
// to boot stop the pool. The pool can be resized, recycles workers by task count or
// memory between tasks, and rolls all workers onto new code (reload) one by one.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { type SerializedError, ServiceError } from './errors.ts';
import type { WorkerStatus } from './http.ts';
import type { DoneMessage, TaskInfo } from './protocol.ts';
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

type PoolEvents = {
  restart: [reason: RestartReason];
  fatal: [err: ServiceError];
  change: [];
};

export class WorkerPool extends EventEmitter<PoolEvents> {
  readonly #opts: Required<PoolOptions>;
  readonly #log: Logger;
  readonly #workers = new Set<WorkerProcess>();
  readonly #jobs = new Map<WorkerProcess, Job>();
  /** Busy workers to retire when their task ends (a scale-down or a reload). */
  readonly #retireAfterTask = new Map<WorkerProcess, 'scale' | 'reload'>();
  /** Workers the master killed, and why: decides how their death is counted. */
  readonly #killed = new Map<WorkerProcess, 'timeout' | 'shutdown'>();
  readonly #queue: Job[] = [];
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

  constructor(opts: PoolOptions) {
    super();
    this.#opts = {
      bootTimeoutMs: Math.max(30_000, opts.taskTimeoutMs),
      maxBootFailures: 5,
      killGraceMs: 0,
      maxTasksPerWorker: 0,
      maxWorkerMemoryBytes: 0,
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
    }
    return stats;
  }

  status(): WorkerStatus[] {
    const now = performance.now();
    return [...this.#workers].map((w) => {
      const job = this.#jobs.get(w);
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

  /** Queues a task; it runs when a worker is idle. Resolves with its outcome, never rejects. */
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
      this.#dispatch();
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
      this.#retire(w, 'reload');
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

  /** Counted towards the pool's size: not leaving, and not marked to leave. */
  #isLive(w: WorkerProcess): boolean {
    return this.#workers.has(w) && w.state !== 'stopping' && !this.#retireAfterTask.has(w);
  }

  #dispatch(): void {
    if (this.#queue.length === 0) return;
    for (const w of this.#workers) {
      if (w.state !== 'idle') continue;
      const job = this.#queue.shift();
      if (job === undefined) return;
      this.#assign(w, job);
    }
  }

  #assign(w: WorkerProcess, job: Job): void {
    w.state = 'busy';
    this.#jobs.set(w, job);
    job.startedAt = performance.now();
    const info: TaskInfo = {
      taskId: job.taskId,
      func: job.request.func,
      messageId: job.request.messageId,
      redelivered: job.request.redelivered,
      attempt: job.request.attempt,
      deadline: Date.now() + this.#opts.taskTimeoutMs,
    };
    // The deadline is the master's: a timer on the monotonic clock, whatever the child does.
    job.timer = setTimeout(() => this.#timeLimit(w, job), this.#opts.taskTimeoutMs);
    w.send({
      type: 'run',
      taskId: job.taskId,
      func: job.request.func,
      args: job.request.args,
      kwargs: job.request.kwargs,
      info,
      wantResult: job.request.wantResult,
    });
    this.emit('change');
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
    if (this.#jobs.get(w) !== job) return;
    job.timedOut = true;
    const fields = { pid: w.pid, taskId: job.taskId, func: job.request.func };
    if (this.#opts.killGraceMs > 0) {
      this.#log.warn(
        { ...fields, killGraceMs: this.#opts.killGraceMs },
        'task reached its time limit; aborting it',
      );
      w.send({ type: 'abort', taskId: job.taskId, reason: 'the task reached its time limit' });
      job.timer = setTimeout(() => this.#kill(w, job), this.#opts.killGraceMs);
      return;
    }
    this.#kill(w, job);
  }

  #kill(w: WorkerProcess, job: Job): void {
    if (this.#jobs.get(w) !== job) return;
    this.#log.warn(
      { pid: w.pid, taskId: job.taskId, func: job.request.func },
      'task timed out; killing its worker',
    );
    this.#killed.set(w, 'timeout');
    w.state = 'stopping';
    w.kill();
    this.#finish(w, {
      outcome: 'timeout',
      error: this.#timeoutError(false),
      durationMs: performance.now() - job.startedAt,
    });
  }

  #finish(w: WorkerProcess, result: TaskResult): void {
    const job = this.#jobs.get(w);
    if (job === undefined) return;
    clearTimeout(job.timer);
    this.#jobs.delete(w);
    job.resolve(result);
  }

  #onDone(w: WorkerProcess, msg: DoneMessage): void {
    const job = this.#jobs.get(w);
    if (w.state !== 'busy' || job === undefined || job.taskId !== msg.taskId) return;
    const durationMs = performance.now() - job.startedAt;
    w.tasksDone++;
    w.state = 'idle';
    let result: TaskResult;
    if (job.timedOut) result = { outcome: 'timeout', error: this.#timeoutError(true), durationMs };
    else if (msg.ok) result = { outcome: 'succeeded', resultJson: msg.resultJson, durationMs };
    else result = { outcome: 'failed', error: msg.error, durationMs };
    this.#finish(w, result);
    this.#afterTask(w);
    this.emit('change');
    this.#dispatch();
  }

  /** Between tasks: leave if marked to, or if worn out (task count, memory). */
  #afterTask(w: WorkerProcess): void {
    const marked = this.#retireAfterTask.get(w);
    if (marked !== undefined) {
      this.#retireAfterTask.delete(w);
      this.#retire(w, marked);
      return;
    }
    const { maxTasksPerWorker, maxWorkerMemoryBytes } = this.#opts;
    const tooMany = maxTasksPerWorker > 0 && w.tasksDone >= maxTasksPerWorker;
    const tooBig = maxWorkerMemoryBytes > 0 && (w.rssBytes ?? 0) > maxWorkerMemoryBytes;
    if (tooMany || tooBig) {
      this.#log.info({ pid: w.pid, tasksDone: w.tasksDone, rssBytes: w.rssBytes }, 'recycling a worker');
      this.#retire(w, 'recycle');
      this.emit('restart', 'recycle');
      this.#reconcile();
    }
  }

  /** Sends a worker away: now if idle, after its task if busy. */
  #retire(w: WorkerProcess, why: 'scale' | 'reload' | 'recycle'): void {
    if (w.state === 'busy') {
      this.#retireAfterTask.set(w, why === 'recycle' ? 'scale' : why);
      return;
    }
    if (w.state === 'starting') w.kill();
    else w.retire();
  }

  /** Forks one child; its boot failure after start-up backs off, and enough in a row stop the pool. */
  #spawn(opts: { forReload?: boolean } = {}): WorkerProcess {
    const w = new WorkerProcess(
      this.#opts.moduleUrl,
      this.#opts.bootTimeoutMs,
      this.#opts.childScript || undefined,
    );
    this.#workers.add(w);
    w.on('done', (msg) => this.#onDone(w, msg));
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
    const job = this.#jobs.get(w);
    const killed = this.#killed.get(w);
    if (job !== undefined) {
      if (killed === 'shutdown') {
        this.#finish(w, { outcome: 'returned', reason: 'still running at the shutdown deadline' });
      } else {
        const how = signal ?? `exit code ${code}`;
        this.#finish(w, {
          outcome: 'crashed',
          error: {
            name: 'WorkerCrashed',
            message: `the worker process died while running the task (${how})`,
            code: 'ERR_WORKER_CRASHED',
          },
          durationMs: performance.now() - job.startedAt,
        });
      }
    }
    const expected = this.#closing || killed !== undefined || w.state === 'stopping';
    this.#workers.delete(w);
    this.#killed.delete(w);
    this.#retireAfterTask.delete(w);
    if (killed === 'timeout') this.emit('restart', 'timeout');
    else if (!expected) {
      this.#log.error({ pid: w.pid, code, signal, busy: job !== undefined }, 'worker died');
      this.emit('restart', 'crash');
    }
    w.state = 'stopping';
    this.emit('change');
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
      for (const w of surplus) this.#retire(w, 'scale');
    }
  }
}
