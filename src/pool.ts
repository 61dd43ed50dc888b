// The worker pool (SPEC §3), after gunicorn's arbiter and BullMQ's child pool: the master
// owns every deadline on a monotonic clock, so a stuck child cannot stop its own kill; a
// child says `ready` before it gets work; a kill is awaited (exit seen) before the slot is
// refilled; deaths are classified; children that keep failing to boot stop the pool.
import { type ChildProcess, fork } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { fileURLToPath } from 'node:url';
import type { Logger } from 'pino';
import { type SerializedError, ServiceError } from './errors.ts';
import type { ChildMessage, RunMessage, TaskInfo } from './protocol.ts';

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
}

type SlotState = 'starting' | 'idle' | 'busy' | 'stopping';

interface Slot {
  child: ChildProcess;
  pid: number | undefined;
  state: SlotState;
  job: Job | undefined;
  /** Why the master killed it, when it did: decides how the death is counted. */
  killReason: 'timeout' | 'shutdown' | undefined;
  exited: Promise<void>;
}

const CHILD_SCRIPT = fileURLToPath(new URL('./child.ts', import.meta.url));

type PoolEvents = {
  restart: [reason: RestartReason];
  fatal: [err: ServiceError];
  change: [];
};

export class WorkerPool extends EventEmitter<PoolEvents> {
  readonly #opts: Required<PoolOptions>;
  readonly #log: Logger;
  readonly #slots = new Set<Slot>();
  readonly #queue: Job[] = [];
  #funcs: ReadonlySet<string> = new Set();
  #nextTaskId = 1;
  #closing = false;
  #started = false;
  #bootFailures = 0;
  #gaveUp = false;
  #respawnTimer: NodeJS.Timeout | undefined;

  constructor(opts: PoolOptions) {
    super();
    this.#opts = {
      bootTimeoutMs: Math.max(30_000, opts.taskTimeoutMs),
      maxBootFailures: 5,
      childScript: CHILD_SCRIPT,
      ...opts,
    };
    this.#log = opts.logger.child({ component: 'pool' });
  }

  /** The names the task module exports as callable, as its children reported them. */
  get funcs(): ReadonlySet<string> {
    return this.#funcs;
  }

  stats(): PoolStats {
    const stats: PoolStats = {
      desired: this.#opts.size,
      starting: 0,
      idle: 0,
      busy: 0,
      queued: this.#queue.length,
    };
    for (const slot of this.#slots) {
      if (slot.state === 'starting') stats.starting++;
      else if (slot.state === 'idle') stats.idle++;
      else if (slot.state === 'busy') stats.busy++;
    }
    return stats;
  }

  /**
   * Starts every child and waits until all are ready. If the task module cannot be
   * loaded, stops them and rejects with ERR_TASK_MODULE: no respawn loop at start-up.
   */
  async start(): Promise<void> {
    const boots: Promise<void>[] = [];
    for (let i = 0; i < this.#opts.size; i++) boots.push(this.#spawn());
    try {
      await Promise.all(boots);
    } catch (err) {
      await this.close(0);
      throw err;
    }
    this.#started = true;
    this.#log.info({ workers: this.#opts.size, funcs: [...this.#funcs] }, 'workers ready');
  }

  /** Queues a task; it runs when a worker is idle. Resolves with its outcome, never rejects. */
  run(request: TaskRequest): Promise<TaskResult> {
    if (this.#closing) return Promise.resolve({ outcome: 'returned', reason: 'the pool is closing' });
    return new Promise((resolve) => {
      this.#queue.push({ taskId: this.#nextTaskId++, request, resolve, startedAt: 0, timer: undefined });
      this.#dispatch();
    });
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
    for (const slot of this.#slots) {
      if (slot.state === 'busy') {
        slot.killReason = 'shutdown';
        slot.child.kill('SIGKILL');
      } else if (slot.state !== 'stopping') {
        slot.state = 'stopping';
        // An idle child exits on disconnect; a starting one may be stuck in its import.
        if (slot.child.connected) slot.child.disconnect();
        else slot.child.kill('SIGKILL');
      }
    }
    const exits = [...this.#slots].map((s) => s.exited);
    const stragglers = setTimeout(() => {
      for (const slot of this.#slots) slot.child.kill('SIGKILL');
    }, 5_000);
    await Promise.all(exits);
    clearTimeout(stragglers);
    this.emit('change');
  }

  #waitForBusy(graceMs: number): Promise<void> {
    const busy = () => [...this.#slots].some((s) => s.state === 'busy');
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

  #dispatch(): void {
    if (this.#queue.length === 0) return;
    for (const slot of this.#slots) {
      if (slot.state !== 'idle') continue;
      const job = this.#queue.shift();
      if (job === undefined) return;
      this.#assign(slot, job);
    }
  }

  #assign(slot: Slot, job: Job): void {
    slot.state = 'busy';
    slot.job = job;
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
    job.timer = setTimeout(() => this.#timeout(slot, job), this.#opts.taskTimeoutMs);
    const message: RunMessage = {
      type: 'run',
      taskId: job.taskId,
      func: job.request.func,
      args: job.request.args,
      kwargs: job.request.kwargs,
      info,
      wantResult: job.request.wantResult,
    };
    slot.child.send(message);
    this.emit('change');
  }

  #finish(slot: Slot, result: TaskResult): void {
    const job = slot.job;
    if (job === undefined) return;
    clearTimeout(job.timer);
    slot.job = undefined;
    job.resolve(result);
  }

  #timeout(slot: Slot, job: Job): void {
    if (slot.job !== job) return;
    const seconds = this.#opts.taskTimeoutMs / 1000;
    this.#log.warn(
      { pid: slot.pid, taskId: job.taskId, func: job.request.func },
      'task timed out; killing its worker',
    );
    slot.killReason = 'timeout';
    slot.state = 'stopping';
    slot.child.kill('SIGKILL');
    this.#finish(slot, {
      outcome: 'timeout',
      error: {
        name: 'TimeoutError',
        message: `task ran past the worker timeout of ${seconds} s`,
        code: 'ERR_TASK_TIMEOUT',
      },
      durationMs: performance.now() - job.startedAt,
    });
  }

  #onMessage(slot: Slot, msg: ChildMessage, onBoot: (err?: ServiceError) => void): void {
    switch (msg.type) {
      case 'ready':
        if (slot.state !== 'starting') return;
        this.#funcs = new Set(msg.funcs);
        slot.state = this.#closing ? 'stopping' : 'idle';
        onBoot();
        this.emit('change');
        this.#dispatch();
        return;
      case 'load-failed':
        onBoot(
          new ServiceError(
            'ERR_TASK_MODULE',
            `cannot load the task module ${this.#opts.moduleUrl}: ${msg.error.message}`,
            {
              cause: msg.error,
            },
          ),
        );
        return;
      case 'done': {
        const job = slot.job;
        if (slot.state !== 'busy' || job === undefined || job.taskId !== msg.taskId) return;
        const durationMs = performance.now() - job.startedAt;
        slot.state = 'idle';
        this.#finish(
          slot,
          msg.ok
            ? { outcome: 'succeeded', resultJson: msg.resultJson, durationMs }
            : { outcome: 'failed', error: msg.error, durationMs },
        );
        this.emit('change');
        this.#dispatch();
        return;
      }
    }
  }

  /** Forks one child; resolves when it is ready, rejects when it fails to boot. */
  #spawn(): Promise<void> {
    const child = fork(this.#opts.childScript, [this.#opts.moduleUrl], {
      // The master's own flags (a test runner's, an inspector) are not the children's.
      execArgv: [],
      serialization: 'json',
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    let markExited: () => void = () => {};
    const slot: Slot = {
      child,
      pid: child.pid,
      state: 'starting',
      job: undefined,
      killReason: undefined,
      exited: new Promise((resolve) => {
        markExited = resolve;
      }),
    };
    this.#slots.add(slot);
    this.emit('change');

    return new Promise<void>((resolve, reject) => {
      let booted = false;
      const bootTimer = setTimeout(() => {
        onBoot(
          new ServiceError(
            'ERR_WORKER_BOOT',
            `a worker did not become ready in ${this.#opts.bootTimeoutMs} ms`,
          ),
        );
      }, this.#opts.bootTimeoutMs);
      const onBoot = (err?: ServiceError) => {
        if (booted) return;
        booted = true;
        clearTimeout(bootTimer);
        if (err === undefined) {
          this.#bootFailures = 0;
          resolve();
          return;
        }
        // A child that failed to start is never reused.
        slot.state = 'stopping';
        child.kill('SIGKILL');
        reject(err);
      };
      child.on('message', (msg: ChildMessage) => this.#onMessage(slot, msg, onBoot));
      child.on('error', (err) => this.#log.error({ err, pid: slot.pid }, 'worker process error'));
      child.on('exit', (code, signal) => {
        onBoot(
          new ServiceError(
            'ERR_WORKER_BOOT',
            `a worker exited before it was ready (${signal ?? `exit code ${code}`}); see its output above`,
          ),
        );
        this.#onExit(slot, code, signal);
        markExited();
      });
    });
  }

  #onExit(slot: Slot, code: number | null, signal: NodeJS.Signals | null): void {
    const wasBusy = slot.job !== undefined;
    const job = slot.job;
    if (job !== undefined) {
      if (slot.killReason === 'shutdown') {
        this.#finish(slot, { outcome: 'returned', reason: 'still running at the shutdown deadline' });
      } else {
        this.#finish(slot, {
          outcome: 'crashed',
          error: {
            name: 'WorkerCrashed',
            message: `the worker process died while running the task (${signal ?? `exit code ${code}`})`,
            code: 'ERR_WORKER_CRASHED',
          },
          durationMs: performance.now() - job.startedAt,
        });
      }
    }
    this.#slots.delete(slot);
    const expected = this.#closing || (slot.state === 'stopping' && slot.killReason !== 'timeout');
    if (slot.killReason === 'timeout') this.emit('restart', 'timeout');
    else if (!expected) {
      this.#log.error({ pid: slot.pid, code, signal, busy: wasBusy }, 'worker died');
      this.emit('restart', 'crash');
    }
    this.emit('change');
    // After the current turn: a boot failure's own handler runs first and sets the backoff.
    setImmediate(() => this.#refill());
  }

  /** Keeps the pool at its size; after start-up, a boot failure backs off, and enough in a row stop the pool. */
  #refill(): void {
    if (this.#closing || this.#gaveUp || !this.#started || this.#respawnTimer !== undefined) return;
    const live = [...this.#slots].filter((s) => s.state !== 'stopping').length;
    for (let i = live; i < this.#opts.size; i++) {
      this.#spawn().catch((err: ServiceError) => {
        this.#bootFailures++;
        this.#log.error({ err, failures: this.#bootFailures }, 'a replacement worker failed to start');
        if (this.#gaveUp) return;
        if (this.#bootFailures >= this.#opts.maxBootFailures) {
          this.#gaveUp = true;
          this.emit(
            'fatal',
            new ServiceError(
              'ERR_WORKER_BOOT',
              `workers failed to start ${this.#bootFailures} times in a row: ${err.message}`,
              { cause: err },
            ),
          );
          return;
        }
        // The slot is refilled from its exit, after a pause that grows with each failure.
        const delay = Math.min(10_000, 100 * 2 ** this.#bootFailures);
        this.#respawnTimer = setTimeout(() => {
          this.#respawnTimer = undefined;
          this.#refill();
        }, delay);
      });
    }
  }
}
