// One worker slot of the pool, after piscina's WorkerInfo and undici's Client: everything
// that belongs to one worker lives here and only here changes it: its process, the tasks
// handed to it (the first runs, the rest wait in the child in order), the master's
// deadline timers for them, its lifecycle (starting, up, on its way out, stopping) and
// why it is leaving or was killed. The pool asks it questions and gives it orders; it
// reports back through events, and when it ends it gives back every task it held.
//
// The deadline is the master's, on the monotonic clock: a stuck child cannot stop its
// own kill. A kill is never the end of the story by itself: the exit is awaited (after
// the results pipe has been read to its end, so results the child wrote before dying are
// counted), and only then are its remaining tasks resolved.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { type SerializedError, type ServiceError, serializeError } from './errors.ts';
import type { Job, TaskResult } from './pool-job.ts';
import type { CancelledMessage, ResultLine, RunTask } from './protocol.ts';
import { WorkerProcess } from './worker-process.ts';

/** A running task older than this no longer takes tasks behind it. */
export const LONG_TASK_MS = 5;

/** Why a worker is on its way out: it finishes its running task first. */
export type LeaveReason = 'scale' | 'reload' | 'recycle';
/** Why the master killed (or retired) a worker: decides how its exit is counted. */
export type KillReason = 'timeout' | 'shutdown' | 'retired';

export type WorkerState = 'starting' | 'idle' | 'busy' | 'stopping';

export interface WorkerOptions {
  moduleUrl: string;
  bootTimeoutMs: number;
  childScript: string | undefined;
  /** Which reload of the task code it runs (see Supervisor). */
  generation: number;
  taskTimeoutMs: number;
  /** The soft time limit: after the AbortSignal fires, how long before SIGKILL (0: at once). */
  killGraceMs: number;
  /** Report the memory after every task (a memory limit is set). */
  rssEachTask: boolean;
  logger: Logger;
}

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when the master killed or retired it; undefined: it died by itself. */
  killedFor: KillReason | undefined;
  /** It had said ready (a death before that is a boot failure, reported through 'bootFailed'). */
  wasUp: boolean;
  /** It was running a task when it died. */
  wasBusy: boolean;
}

type WorkerEvents = {
  ready: [];
  /** `genuine`: the module failed to load or the child died by itself, not a kill of ours. */
  bootFailed: [err: ServiceError, genuine: boolean];
  /** One or more of its tasks ended (or were taken back): it may have room, or be done. */
  settled: [];
  /** A task's run time, as the child measured it. */
  ran: [ms: number];
  /** Tasks it held and never started, to run elsewhere (in their order). */
  returned: [jobs: Job[]];
  exit: [info: ExitInfo];
};

export class PoolWorker extends EventEmitter<WorkerEvents> {
  readonly generation: number;
  readonly #opts: WorkerOptions;
  readonly #proc: WorkerProcess;
  readonly #log: Logger;
  #phase: 'starting' | 'up' | 'stopping' = 'starting';
  #funcs: ReadonlySet<string> = new Set();
  /** The tasks handed over: the first runs, the rest wait in the child in order. */
  #jobs: Job[] = [];
  /** Asked to give back what it has not started, until it answers. */
  #cancelling = false;
  #leaving: LeaveReason | undefined;
  #killedFor: KillReason | undefined;
  #everUp = false;
  tasksDone = 0;

  constructor(opts: WorkerOptions) {
    super();
    this.#opts = opts;
    this.generation = opts.generation;
    this.#proc = new WorkerProcess(opts.moduleUrl, opts.bootTimeoutMs, opts.childScript);
    this.#log = opts.logger;
    this.#proc.on('done', (lines) => this.#onResults(lines));
    this.#proc.on('cancelled', (msg) => this.#onCancelled(msg));
    this.#proc.on('exit', (code, signal) => this.#onExit(code, signal));
    this.#proc.ready.then(
      (funcs) => {
        if (this.#phase !== 'starting') return;
        this.#phase = 'up';
        this.#everUp = true;
        this.#funcs = new Set(funcs);
        this.emit('ready');
      },
      (err: ServiceError) => {
        const genuine = this.#killedFor === undefined;
        this.#phase = 'stopping';
        this.emit('bootFailed', err, genuine);
      },
    );
  }

  get pid(): number | undefined {
    return this.#proc.pid;
  }

  get rssBytes(): number | undefined {
    return this.#proc.rssBytes;
  }

  /** Resolves once its process has exited and its tasks are resolved. */
  get exited(): Promise<void> {
    return this.#proc.exited;
  }

  get state(): WorkerState {
    if (this.#phase === 'stopping') return 'stopping';
    if (this.#phase === 'starting') return 'starting';
    return this.#jobs.length > 0 ? 'busy' : 'idle';
  }

  get isUp(): boolean {
    return this.#phase === 'up';
  }

  /** Counted towards the pool's size: not stopping, and not on its way out. */
  get isLive(): boolean {
    return this.#phase !== 'stopping' && this.#leaving === undefined;
  }

  get funcs(): ReadonlySet<string> {
    return this.#funcs;
  }

  /** Tasks handed to it and not resolved: the running one and those waiting behind it. */
  get held(): number {
    return this.#jobs.length;
  }

  /** The running task, if any. */
  get running(): Job | undefined {
    return this.#jobs[0];
  }

  /** Whether it may take one more task now, beyond `planned` about to be handed; `depth`: how many it may hold. */
  canTake(planned: number, depth: number, now: number, maxTasks: number): boolean {
    if (this.#phase !== 'up' || this.#leaving !== undefined || this.#cancelling) return false;
    // Its process has gone (the exit is being handled): nothing handed to it would arrive.
    if (!this.#proc.connected) return false;
    const load = this.#jobs.length + planned;
    // A worker due for recycling after N tasks is never handed more than N.
    if (maxTasks > 0 && this.tasksDone + load >= maxTasks) return false;
    if (load === 0) return true;
    if (load >= depth) return false;
    // Never queue behind a task that has turned out long.
    const first = this.#jobs[0];
    return first === undefined || now - first.startedAt < LONG_TASK_MS;
  }

  /** Hands tasks over, in order, after those it holds. */
  hand(jobs: Job[]): void {
    const wasIdle = this.#jobs.length === 0;
    this.#jobs.push(...jobs);
    if (wasIdle) this.#startClock(this.#jobs[0] as Job);
    try {
      if (!this.#send(jobs)) this.#undeliverable(jobs);
    } catch {
      // One of them cannot be serialised (nested past JSON.stringify's stack): send them
      // one by one, so that only the unsendable ones end, and nothing else is disturbed.
      for (const job of jobs) {
        try {
          if (!this.#send([job])) this.#undeliverable([job]);
        } catch (err) {
          this.#unsendable(job, err);
        }
      }
    }
  }

  /** The child can no longer be told anything (it is exiting): these were never sent, they go back. */
  #undeliverable(jobs: Job[]): void {
    const back = new Set(jobs);
    const wasRunning = this.#jobs[0] !== undefined && back.has(this.#jobs[0]);
    this.#jobs = this.#jobs.filter((j) => !back.has(j));
    for (const job of jobs) {
      clearTimeout(job.timer);
      job.timer = undefined;
      job.startedAt = 0;
    }
    const next = this.#jobs[0];
    if (wasRunning && next !== undefined) this.#startClock(next);
    // Not from inside the dispatch that handed them over: after it.
    queueMicrotask(() => this.emit('returned', jobs));
  }

  #send(jobs: Job[]): boolean {
    const tasks: RunTask[] = jobs.map(({ taskId, request }) => ({
      taskId,
      func: request.func,
      args: request.args,
      kwargs: request.kwargs,
      messageId: request.messageId,
      redelivered: request.redelivered,
      attempt: request.attempt,
      wantResult: request.wantResult,
    }));
    return this.#proc.send({
      type: 'run',
      tasks,
      timeoutMs: this.#opts.taskTimeoutMs,
      rssEachTask: this.#opts.rssEachTask,
    });
  }

  /** A task that cannot reach the child ends alone, as crashed: never the process. */
  #unsendable(job: Job, err: unknown): void {
    const wasRunning = this.#jobs[0] === job;
    this.#jobs = this.#jobs.filter((j) => j !== job);
    const cause = serializeError(err);
    this.#log.error(
      { taskId: job.taskId, func: job.request.func, err: cause },
      'a task could not be handed to its worker',
    );
    job.end({
      outcome: 'crashed',
      error: {
        name: 'DispatchError',
        message: `the task could not be handed to a worker: ${cause.message}`,
        code: 'ERR_DISPATCH',
      },
      durationMs: 0,
    });
    const next = this.#jobs[0];
    if (wasRunning && next !== undefined) this.#startClock(next);
  }

  /** Asks the child for the tasks it holds and has not started (answered by `cancelled`). */
  takeBack(): void {
    if (this.#jobs.length <= 1 || this.#cancelling || this.#phase !== 'up') return;
    this.#cancelling = true;
    this.#proc.send({ type: 'cancel' });
  }

  /** Sends it away: at once if starting or idle, after its running task if busy. */
  leave(why: LeaveReason): void {
    if (this.#phase === 'stopping' || this.#leaving !== undefined) return;
    if (this.#phase === 'starting') {
      this.#kill('retired');
      return;
    }
    this.#leaving = why;
    if (this.#jobs.length === 0) this.#retire();
    else this.takeBack();
  }

  /** The drain's end: a busy worker is killed (its task goes back), any other retired. */
  stop(): void {
    if (this.#phase === 'stopping') return;
    if (this.#phase === 'starting') this.#kill('retired');
    else if (this.#jobs.length > 0) this.#kill('shutdown');
    else this.#retire();
  }

  /** The last resort for a worker that does not exit when asked. */
  forceKill(): void {
    this.#killedFor ??= 'shutdown';
    this.#proc.kill();
  }

  #kill(why: KillReason): void {
    this.#killedFor ??= why;
    this.#phase = 'stopping';
    this.#proc.kill();
  }

  #retire(): void {
    this.#killedFor ??= 'retired';
    this.#phase = 'stopping';
    this.#proc.retire();
  }

  #startClock(job: Job): void {
    // A task handed back (a cancel) and handed out again may still carry its old timer.
    clearTimeout(job.timer);
    job.startedAt = performance.now();
    job.timer = setTimeout(() => this.#timeLimit(job), this.#opts.taskTimeoutMs);
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

  /**
   * The time limit: abort and allow the grace, or kill now. One turn of the event loop
   * first: timers run before the master reads its pipes, and a result waiting there
   * (the master was busy, or frozen) means the task finished in time.
   */
  #timeLimit(job: Job): void {
    job.timer = undefined;
    setImmediate(() => this.#pastTimeLimit(job));
  }

  #pastTimeLimit(job: Job): void {
    if (this.#jobs[0] !== job || job.ended) return;
    job.timedOut = true;
    const fields = { pid: this.pid, taskId: job.taskId, func: job.request.func };
    const graceMs = this.#opts.killGraceMs;
    if (graceMs > 0) {
      this.#log.warn({ ...fields, killGraceMs: graceMs }, 'task reached its time limit; aborting it');
      this.#proc.send({ type: 'abort', taskId: job.taskId, reason: 'the task reached its time limit' });
      this.takeBack();
      job.timer = setTimeout(() => {
        if (this.#jobs[0] !== job || job.ended) return;
        this.#log.warn(fields, 'task did not stop in its grace; killing its worker');
        this.#kill('timeout');
      }, graceMs);
      return;
    }
    this.#log.warn(fields, 'task timed out; killing its worker');
    this.#kill('timeout');
  }

  #onResults(lines: ResultLine[]): void {
    for (const line of lines) {
      const job = this.#jobs[0];
      if (job === undefined || job.taskId !== line.taskId) {
        this.#log.error(
          { pid: this.pid, taskId: line.taskId },
          'a worker reported a task it was not running',
        );
        continue;
      }
      this.#jobs.shift();
      const durationMs = performance.now() - job.startedAt;
      // The child's own measure: results read together would otherwise look like one
      // long task and several of no length.
      this.emit('ran', line.ranMs ?? durationMs);
      this.tasksDone++;
      job.end(this.#resultOf(job, line, durationMs));
      // The child starts the next one as it reports this one: so does its clock.
      const next = this.#jobs[0];
      if (next !== undefined) this.#startClock(next);
    }
    this.#afterTasks();
  }

  #resultOf(job: Job, line: ResultLine, durationMs: number): TaskResult {
    if (job.timedOut) return { outcome: 'timeout', error: this.#timeoutError(true), durationMs };
    if (line.ok) return { outcome: 'succeeded', resultJson: line.resultJson, durationMs };
    return { outcome: 'failed', error: line.error, durationMs };
  }

  #onCancelled(msg: CancelledMessage): void {
    this.#cancelling = false;
    const ids = new Set(msg.taskIds);
    const back = this.#jobs.filter((j) => ids.has(j.taskId));
    this.#jobs = this.#jobs.filter((j) => !ids.has(j.taskId));
    if (back.length > 0) this.emit('returned', back);
    this.#afterTasks();
  }

  /** Between tasks: a worker on its way out leaves once it holds nothing. */
  #afterTasks(): void {
    if (this.#leaving !== undefined && this.#jobs.length === 0 && this.#phase === 'up') this.#retire();
    this.emit('settled');
  }

  #onExit(code: number | null, signal: NodeJS.Signals | null): void {
    const wasUp = this.#everUp;
    this.#phase = 'stopping';
    const [running, ...waiting] = this.#jobs;
    this.#jobs = [];
    if (running !== undefined) running.end(this.#endOfRunning(running, code, signal));
    if (waiting.length > 0) this.emit('returned', waiting);
    this.emit('exit', { code, signal, killedFor: this.#killedFor, wasUp, wasBusy: running !== undefined });
  }

  /** What became of the task that was running when its process ended. */
  #endOfRunning(job: Job, code: number | null, signal: NodeJS.Signals | null): TaskResult {
    const durationMs = job.startedAt === 0 ? 0 : performance.now() - job.startedAt;
    if (job.timedOut) return { outcome: 'timeout', error: this.#timeoutError(false), durationMs };
    if (this.#killedFor === 'shutdown')
      return { outcome: 'returned', reason: 'still running at the shutdown deadline' };
    // Killed for another task's timeout, whose result then turned up in the pipe: this
    // one was not at fault, and goes back to the queue.
    if (this.#killedFor !== undefined) return { outcome: 'returned', reason: 'its worker was stopped' };
    const how = signal ?? `exit code ${code}`;
    return {
      outcome: 'crashed',
      error: {
        name: 'WorkerCrashed',
        message: `the worker process died while running the task (${how})`,
        code: 'ERR_WORKER_CRASHED',
      },
      durationMs,
    };
  }
}
