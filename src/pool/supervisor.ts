// The pool's arbiter, after gunicorn's: how many workers there are, and which. It spawns,
// reconciles the live workers with the size asked for, rolls them onto new code (reload),
// recycles worn ones, classifies exits, and backs off when workers fail to boot.
//
// Everything converges through one function, #reconcile(), called after every change:
// whatever interleaving of resizes, reloads, recycles, timeouts and crashes happened, it
// moves the pool one safe step towards "`desired` live workers, all of the newest code",
// never dropping below the workers that serve while the request is at least one. Only
// genuine boot failures (the module cannot load, a child dies on its own before ready,
// or never says ready) count towards giving up; a worker the pool itself retired while
// it was starting does not.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { ServiceError } from '../errors.ts';
import { exponentialDelay } from '../util/backoff.ts';
import type { Job } from './job.ts';
import { reconcile, type SlotView } from './reconcile.ts';
import { type ExitInfo, Slot } from './slot.ts';

export type RestartReason = 'timeout' | 'crash' | 'recycle' | 'cancel';

/** How many workers may be starting at once (see PoolTarget.maxStarting). */
const SPAWN_STEP = 4;

export interface SupervisorOptions {
  size: number;
  moduleUrl: string;
  taskTimeoutMs: number;
  killGraceMs: number;
  maxTasksPerWorker: number;
  maxWorkerMemoryBytes: number;
  /** The largest result a task may return for a reply. */
  maxResultBytes: number;
  bootTimeoutMs: number;
  /** After start-up, this many genuine boot failures in a row make the pool give up ('fatal'). */
  maxBootFailures: number;
  logger: Logger;
}

type SupervisorEvents = {
  restart: [reason: RestartReason];
  fatal: [err: ServiceError];
  /** Workers came or went, or one has room: time to dispatch. */
  change: [];
  /** Tasks a worker held and never started. */
  returned: [jobs: Job[]];
  ran: [ms: number];
};

export class Supervisor extends EventEmitter<SupervisorEvents> {
  readonly #opts: SupervisorOptions;
  readonly #log: Logger;
  readonly #workers = new Set<Slot>();
  #desired: number;
  /** The code generation workers should run; a reload makes a new one. */
  #generation = 0;
  /** A generation whose workers failed to boot during a roll: the old workers stay. */
  #failedGeneration = -1;
  #rollWaiters: (() => void)[] = [];
  #started = false;
  #closing = false;
  #gaveUp = false;
  #bootFailures = 0;
  #backoff: NodeJS.Timeout | undefined;
  #reconcileSoon: NodeJS.Immediate | undefined;
  #roster = 0;
  #nextId = 1;

  constructor(opts: SupervisorOptions) {
    super();
    this.#opts = opts;
    this.#desired = opts.size;
    this.#log = opts.logger;
  }

  get workers(): ReadonlySet<Slot> {
    return this.#workers;
  }

  get desired(): number {
    return this.#desired;
  }

  /** Changes whenever a worker becomes ready or exits: what depends on who is up is stale. */
  get roster(): number {
    return this.#roster;
  }

  /** Genuine boot failures in a row (0 once a worker boots). */
  get bootFailures(): number {
    return this.#bootFailures;
  }

  get closing(): boolean {
    return this.#closing;
  }

  /**
   * Starts the first workers and waits until all are ready. If the task module cannot be
   * loaded, stops them and rejects with ERR_TASK_MODULE: no respawn loop at start-up.
   */
  async start(): Promise<void> {
    try {
      // In steps of SPAWN_STEP, each once the one before is up (see reconcile.ts).
      for (let started = 0; started < this.#desired; ) {
        const boots: Promise<void>[] = [];
        for (; boots.length < SPAWN_STEP && started < this.#desired; started++)
          boots.push(this.#booted(this.#spawn()));
        await Promise.all(boots);
      }
    } catch (err) {
      await this.close(0, () => false);
      throw err;
    }
    this.#started = true;
    this.#reconcile();
  }

  #booted(w: Slot): Promise<void> {
    return new Promise((resolve, reject) => {
      w.once('ready', resolve);
      w.once('bootFailed', reject);
    });
  }

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
   * Rolls every worker onto the task module's current code, one at a time: a new worker
   * must be ready before an old one leaves (after its task), so capacity never drops. If
   * the new code cannot load, the roll stops and the old workers stay. Reloads asked for
   * during a roll fold into it: the roll goes on to the newest code. Resolves when no
   * worker runs older code, or the roll stopped.
   */
  reload(): Promise<void> {
    if (this.#closing) return Promise.resolve();
    this.#generation++;
    this.#log.info({ generation: this.#generation }, 'reloading workers');
    const done = new Promise<void>((resolve) => this.#rollWaiters.push(resolve));
    this.#reconcile();
    return done;
  }

  /**
   * The drain's end: waits until no worker holds a task that `busy` says matters, up to
   * `graceMs`, then kills those still busy (their tasks go back) and stops the rest.
   */
  async close(graceMs: number, busy: () => boolean): Promise<void> {
    this.#closing = true;
    clearTimeout(this.#backoff);
    clearImmediate(this.#reconcileSoon);
    this.#endRoll();
    if (graceMs > 0 && busy()) await this.#waitUntil(() => !busy(), graceMs);
    for (const w of this.#workers) w.stop();
    const exits = [...this.#workers].map((w) => w.exited);
    const stragglers = setTimeout(() => {
      for (const w of this.#workers) w.forceKill();
    }, 5_000);
    await Promise.all(exits);
    clearTimeout(stragglers);
    this.emit('change');
  }

  #waitUntil(done: () => boolean, ms: number): Promise<void> {
    return new Promise((resolve) => {
      const check = () => {
        if (!done()) return;
        finish();
      };
      const finish = () => {
        clearTimeout(timer);
        this.off('change', check);
        resolve();
      };
      const timer = setTimeout(finish, ms);
      this.on('change', check);
    });
  }

  #spawn(): Slot {
    const generation = this.#generation;
    const w = new Slot({
      id: this.#nextId++,
      moduleUrl: this.#opts.moduleUrl,
      bootTimeoutMs: this.#opts.bootTimeoutMs,
      generation,
      taskTimeoutMs: this.#opts.taskTimeoutMs,
      killGraceMs: this.#opts.killGraceMs,
      rssEachTask: this.#opts.maxWorkerMemoryBytes > 0,
      maxResultBytes: this.#opts.maxResultBytes,
      logger: this.#log,
    });
    this.#workers.add(w);
    w.on('ready', () => {
      this.#roster++;
      this.#bootFailures = 0;
      if (this.#closing) w.stop();
      this.#changed();
    });
    w.on('bootFailed', (err, genuine) => this.#onBootFailed(w, err, genuine));
    w.on('ran', (ms) => this.emit('ran', ms));
    w.on('returned', (jobs) => this.emit('returned', jobs));
    w.on('settled', () => {
      this.#recycleIfWorn(w);
      this.emit('change');
    });
    w.on('exit', (info) => this.#onExit(w, info));
    return w;
  }

  #onBootFailed(w: Slot, err: ServiceError, genuine: boolean): void {
    if (!genuine || !this.#started || this.#closing) return; // start() reports its own
    const rolling = w.generation > this.#failedGeneration && this.#hasOlderThan(w.generation);
    if (rolling) {
      // New code that does not load: keep the old workers, and say so once.
      this.#failedGeneration = w.generation;
      this.#log.error({ err }, 'reload stopped: the new task module does not start; the old workers stay');
      void w.exited.then(() => this.#endRoll());
      return;
    }
    this.#bootFailures++;
    this.#log.error({ err, failures: this.#bootFailures }, 'a replacement worker failed to start');
    // The system could not fork (no file descriptors or processes left): not the task
    // code's fault, and it passes; keep trying with backoff, never give up on it.
    const spawnFailed = err.code === 'ERR_WORKER_SPAWN';
    if (!spawnFailed && this.#bootFailures >= this.#opts.maxBootFailures) {
      this.#gaveUp = true;
      const message = `workers failed to start ${this.#bootFailures} times in a row: ${err.message}`;
      this.emit('fatal', new ServiceError('ERR_WORKER_BOOT', message, { cause: err }));
      return;
    }
    // Refilled after a pause that grows with each failure, not in a tight loop.
    clearTimeout(this.#backoff);
    this.#backoff = setTimeout(
      () => {
        this.#backoff = undefined;
        this.#reconcile();
      },
      exponentialDelay(this.#bootFailures + 1, { initialMs: 100, maxMs: 10_000 }),
    );
  }

  #hasOlderThan(generation: number): boolean {
    for (const w of this.#workers) if (w.isLive && w.generation < generation) return true;
    return false;
  }

  /** Between tasks: a worn worker (task count, memory) leaves and is replaced. */
  #recycleIfWorn(w: Slot): void {
    if (!w.isLive) return;
    const { maxTasksPerWorker, maxWorkerMemoryBytes } = this.#opts;
    const tooMany = maxTasksPerWorker > 0 && w.tasksDone >= maxTasksPerWorker;
    const tooBig = maxWorkerMemoryBytes > 0 && (w.rssBytes ?? 0) > maxWorkerMemoryBytes;
    if (!tooMany && !tooBig) return;
    this.#log.info({ pid: w.pid, tasksDone: w.tasksDone, rssBytes: w.rssBytes }, 'recycling a worker');
    this.emit('restart', 'recycle');
    w.leave('recycle');
    this.#reconcile();
  }

  #onExit(w: Slot, info: ExitInfo): void {
    this.#workers.delete(w);
    this.#roster++;
    if (info.killedFor === 'timeout') this.emit('restart', 'timeout');
    else if (info.killedFor === 'cancel') this.emit('restart', 'cancel');
    else if (info.killedFor === 'protocol') this.emit('restart', 'crash');
    else if (info.killedFor === undefined && info.wasUp && !this.#closing) {
      this.#log.error(
        { pid: w.pid, code: info.code, signal: info.signal, busy: info.wasBusy },
        'worker died',
      );
      this.emit('restart', 'crash');
    }
    this.#changed();
  }

  #changed(): void {
    this.emit('change');
    // After this turn: a boot failure's own handler runs first and sets the backoff.
    this.#reconcileSoon ??= setImmediate(() => {
      this.#reconcileSoon = undefined;
      this.#reconcile();
    });
  }

  /** One safe step (or several) towards `desired` live workers of the newest code (see reconcile.ts). */
  #reconcile(): void {
    if (this.#closing || this.#gaveUp || !this.#started) return;
    const byId = new Map<number, Slot>();
    const views: SlotView[] = [];
    for (const w of this.#workers) {
      byId.set(w.id, w);
      views.push({ id: w.id, generation: w.generation, state: w.state, live: w.isLive, up: w.isUp });
    }
    const plan = reconcile(views, {
      desired: this.#desired,
      generation: this.#generation,
      failedGeneration: this.#failedGeneration,
      backingOff: this.#backoff !== undefined,
      maxStarting: SPAWN_STEP,
    });
    for (const { id, why } of plan.leave) byId.get(id)?.leave(why);
    if (plan.rollDone) this.#endRoll('reload done');
    for (let i = 0; i < plan.spawn; i++) this.#spawn();
    if (plan.spawn > 0) this.emit('change');
  }

  #endRoll(message?: string): void {
    const waiters = this.#rollWaiters;
    if (waiters.length === 0) return;
    this.#rollWaiters = [];
    if (message !== undefined) this.#log.info(message);
    for (const resolve of waiters) resolve();
  }
}
