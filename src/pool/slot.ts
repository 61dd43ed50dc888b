// One worker slot of the pool, after piscina's WorkerInfo and undici's Client: everything
// that belongs to one worker lives here and only here changes it: its process, the tasks
// handed to it (the first runs, the rest wait in the child in order; the list and its one
// rule are held-jobs.ts's, changed only from here), its lifecycle (starting, up, on its
// way out, stopping) and why it is leaving or was killed. The pool asks it questions and
// gives it orders; it reports back through events, and when it ends it gives back every
// task it held.
//
// How its running task is stopped, at its time limit or by a cancel, is task-stop.ts's,
// on the master's clock. A kill is never the end of the story by itself: the exit is
// awaited (after the results pipe has been read to its end, so results the child wrote
// before dying are counted), and only then are its remaining tasks resolved, as
// task-end.ts says. How tasks cross to the child, and the two ways that can fail, is
// hand-over.ts's.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { ServiceError } from '../errors.ts';
import type { CancelledMessage, ResultLine } from '../ipc/protocol.ts';
import type { TaskLimits } from '../ipc/task-options.ts';
import { Child } from './child.ts';
import { HandOver } from './hand-over.ts';
import { HeldJobs } from './held-jobs.ts';
import { mayHoldMore } from './hold-rule.ts';
import type { Job } from './job.ts';
import { endAtExit, endOfResult } from './task-end.ts';
import { TaskStop } from './task-stop.ts';

/** Why a worker is on its way out: it finishes its running task first. */
export type LeaveReason = 'scale' | 'reload' | 'recycle';
/** Why the master killed (or retired) a worker: decides how its exit is counted. */
export type KillReason = 'timeout' | 'shutdown' | 'retired' | 'protocol' | 'cancel';

export type SlotState = 'starting' | 'idle' | 'busy' | 'stopping';

export interface SlotOptions {
  /** Its number in the pool, for reconcile's plans and the logs. */
  id: number;
  moduleUrl: string;
  bootTimeoutMs: number;
  /** Which reload of the task code it runs (see Supervisor). */
  generation: number;
  taskTimeoutMs: number;
  /** The soft time limit: after the AbortSignal fires, how long before SIGKILL (0: at once). */
  killGraceMs: number;
  /** Report the memory after every task (a memory limit is set). */
  rssEachTask: boolean;
  /** The largest result a task may return for a reply (--max-result-bytes). */
  maxResultBytes: number;
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

type SlotEvents = {
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

/**
 * Where a slot is in its life, one value: only the transitions in this file change it.
 * `killedFor` says why the master ended it (undefined: its process died by itself), and
 * `wasUp` whether it had said ready.
 */
type Phase =
  | { name: 'starting' }
  | { name: 'up' }
  /** On its way out: it finishes what it holds, then retires. */
  | { name: 'leaving'; why: LeaveReason }
  /** Killed or retired, or its process died: the exit is awaited. */
  | { name: 'stopping'; killedFor: KillReason | undefined; wasUp: boolean }
  | { name: 'exited'; killedFor: KillReason | undefined; wasUp: boolean };

export class Slot extends EventEmitter<SlotEvents> {
  readonly id: number;
  readonly generation: number;
  readonly #opts: SlotOptions;
  readonly #child: Child;
  readonly #log: Logger;
  #phase: Phase = { name: 'starting' };
  #funcs: ReadonlySet<string> = new Set();
  /** The options its task code declares, by function (README "Per-task options"). */
  #limits: Readonly<Record<string, TaskLimits>> = {};
  /** The tasks handed over: the first runs, the rest wait in the child in order. */
  readonly #jobs = new HeldJobs((job) => this.#taskStop.started(job));
  /** Asked to give back what it has not started, until it answers. */
  #takeBackAsked = false;
  /** What the child did wrong, when it broke the protocol. */
  #protocolProblem: string | undefined;
  /** How its running task is stopped: at its time limit, or by a cancel (task-stop.ts). */
  readonly #taskStop: TaskStop;
  /** How tasks cross to the child, and what happens when they cannot (hand-over.ts). */
  readonly #handOver: HandOver;
  tasksDone = 0;

  constructor(opts: SlotOptions) {
    super();
    this.#opts = opts;
    this.id = opts.id;
    this.generation = opts.generation;
    this.#child = new Child({
      moduleUrl: opts.moduleUrl,
      bootTimeoutMs: opts.bootTimeoutMs,
      // A result line holds the result as a JSON string (each byte up to 6 when escaped),
      // an error (4,000 characters of message and of stack at most) and a few numbers.
      maxLineBytes: opts.maxResultBytes * 6 + 64 * 1024,
    });
    this.#log = opts.logger;
    this.#taskStop = new TaskStop({
      log: this.#log,
      running: () => this.#jobs.running,
      ending: () => this.#killedFor !== undefined,
      pid: () => this.pid,
      timeoutOf: (job) => this.#timeoutOf(job),
      graceOf: (job) => this.#graceOf(job),
      abort: (job, reason, cancel) =>
        this.#child.send({ type: 'abort', taskId: job.taskId, reason, ...(cancel ? { cancel: true } : {}) }),
      takeBack: () => this.takeBack(),
      kill: (why) => this.#kill(why),
    });
    this.#handOver = new HandOver({
      child: this.#child,
      jobs: this.#jobs,
      limits: () => this.#limits,
      taskTimeoutMs: opts.taskTimeoutMs,
      rssEachTask: opts.rssEachTask,
      maxResultBytes: opts.maxResultBytes,
      log: this.#log,
      returned: (jobs) => this.emit('returned', jobs),
    });
    this.#child.on('done', (lines) => this.#onResults(lines));
    this.#child.on('cancelled', (msg) => this.#onCancelled(msg));
    this.#child.on('protocolError', (problem) => this.#onProtocolError(problem));
    this.#child.on('exit', (code, signal) => this.#onExit(code, signal));
    this.#child.ready.then(
      (ready) => {
        if (this.#phase.name !== 'starting') return;
        this.#phase = { name: 'up' };
        this.#funcs = new Set(ready.funcs);
        this.#limits = ready.limits ?? {};
        this.emit('ready');
      },
      (err: ServiceError) => {
        const genuine = this.#killedFor === undefined;
        if (this.#phase.name !== 'exited')
          this.#phase = { name: 'stopping', killedFor: this.#killedFor, wasUp: false };
        this.emit('bootFailed', err, genuine);
      },
    );
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  get rssBytes(): number | undefined {
    return this.#child.rssBytes;
  }

  /** Resolves once its process has exited and its tasks are resolved. */
  get exited(): Promise<void> {
    return this.#child.exited;
  }

  get state(): SlotState {
    const { name } = this.#phase;
    if (name === 'stopping' || name === 'exited') return 'stopping';
    if (name === 'starting') return 'starting';
    return this.#jobs.count > 0 ? 'busy' : 'idle';
  }

  /** It has said ready and has not been stopped (it may be on its way out). */
  get isUp(): boolean {
    return this.#phase.name === 'up' || this.#phase.name === 'leaving';
  }

  /** Counted towards the pool's size: starting or up, and not on its way out. */
  get isLive(): boolean {
    return this.#phase.name === 'starting' || this.#phase.name === 'up';
  }

  /** Why the master ended it, once it did. */
  get #killedFor(): KillReason | undefined {
    const phase = this.#phase;
    return phase.name === 'stopping' || phase.name === 'exited' ? phase.killedFor : undefined;
  }

  get funcs(): ReadonlySet<string> {
    return this.#funcs;
  }

  /** The options its task code declares, by function. */
  get limits(): Readonly<Record<string, TaskLimits>> {
    return this.#limits;
  }

  /** A task's time limit: its function's own, or the pool's. */
  #timeoutOf(job: Job): number {
    return this.#limits[job.request.func]?.timeoutMs ?? this.#opts.taskTimeoutMs;
  }

  /** Between its signal and its kill: its function's own grace, or the pool's. */
  #graceOf(job: Job): number {
    return this.#limits[job.request.func]?.killGraceMs ?? this.#opts.killGraceMs;
  }

  /** Tasks handed to it and not resolved: the running one and those waiting behind it. */
  get held(): number {
    return this.#jobs.count;
  }

  /** The running task, if any. */
  get running(): Job | undefined {
    return this.#jobs.running;
  }

  /**
   * Whether it may take one more task now, beyond `planned` about to be handed; `depth`:
   * how many it may hold; `longMs`: how long a running task may have run and still take
   * the next behind it.
   */
  canTake(planned: number, depth: number, now: number, maxTasks: number, longMs: number): boolean {
    if (this.#phase.name !== 'up' || this.#takeBackAsked) return false;
    // Its process has gone (the exit is being handled): nothing handed to it would arrive.
    if (!this.#child.connected) return false;
    const load = this.#jobs.count + planned;
    // A worker due for recycling after N tasks is never handed more than N.
    if (maxTasks > 0 && this.tasksDone + load >= maxTasks) return false;
    // Under a memory limit the worker is weighed after each task and replaced before it
    // starts another once over it: a task held ahead would start first. Only a pipeline of
    // tiny tasks (deeper than the next) goes ahead of the weighing, as it always has.
    if (this.#opts.rssEachTask && load === 1 && depth <= 2) return false;
    const first = this.#jobs.running;
    return mayHoldMore(load, depth, first === undefined ? undefined : now - first.startedAt, longMs);
  }

  /** Hands tasks over, in order, after those it holds (hand-over.ts). */
  hand(jobs: Job[]): void {
    this.#handOver.hand(jobs);
  }

  /**
   * Cancels a task it holds (an operator's cancel): the running one gets its AbortSignal,
   * then the kill after its grace; one waiting behind it is asked back, and the scheduler
   * ends it unrun. Undefined when it holds no such task.
   */
  cancel(match: (job: Job) => boolean): 'running' | 'queued' | undefined {
    const job = this.#jobs.find(match);
    if (job === undefined || job.ended) return undefined;
    // Cancelled already: its kill is on its way; a repeated cancel must not put it off.
    const again = job.cancelled;
    job.cancelled = true;
    if (this.#jobs.running === job) {
      if (!again) this.#taskStop.cancelled(job);
      return 'running';
    }
    this.takeBack();
    return 'queued';
  }

  /** Asks the child for the tasks it holds and has not started (answered by `cancelled`). */
  takeBack(): void {
    if (this.#jobs.count <= 1 || this.#takeBackAsked || !this.isUp) return;
    this.#takeBackAsked = true;
    this.#child.send({ type: 'cancel' });
  }

  /** Sends it away: at once if starting or idle, after its running task if busy. */
  leave(why: LeaveReason): void {
    if (this.#phase.name !== 'starting' && this.#phase.name !== 'up') return;
    if (this.#phase.name === 'starting') {
      this.#kill('retired');
      return;
    }
    this.#phase = { name: 'leaving', why };
    if (this.#jobs.count === 0) this.#retire();
    else this.takeBack();
  }

  /** The drain's end: a busy worker is killed (its task goes back), any other retired. */
  stop(): void {
    if (!this.isLive && !this.isUp) return;
    if (this.#phase.name === 'starting') this.#kill('retired');
    else if (this.#jobs.count > 0) this.#kill('shutdown');
    else this.#retire();
  }

  /** The last resort for a worker that does not exit when asked. */
  forceKill(): void {
    this.#stopping('shutdown');
    this.#child.kill();
  }

  #kill(why: KillReason): void {
    this.#stopping(why);
    this.#child.kill();
  }

  #retire(): void {
    this.#stopping('retired');
    this.#child.retire();
  }

  /** Into `stopping`, the first reason given kept. */
  #stopping(why: KillReason): void {
    const phase = this.#phase;
    if (phase.name === 'stopping' || phase.name === 'exited') phase.killedFor ??= why;
    else this.#phase = { name: 'stopping', killedFor: why, wasUp: this.isUp };
  }

  #onResults(lines: ResultLine[]): void {
    for (const line of lines) {
      // Started the next one's clock: the child starts it as it reports this one.
      const job = this.#jobs.finish(line.taskId);
      if (job === undefined) {
        this.#child.breach('a result for a task it was not running');
        return;
      }
      const durationMs = performance.now() - job.startedAt;
      // The child's own measure: results read together would otherwise look like one
      // long task and several of no length.
      this.emit('ran', line.ranMs ?? durationMs);
      this.tasksDone++;
      job.end(endOfResult(job, line, durationMs, this.#timeoutOf(job)));
    }
    this.#afterTasks();
  }

  /** The child broke the protocol (the child kills it): its running task ends crashed, for it. */
  #onProtocolError(problem: string): void {
    this.#protocolProblem = problem;
    this.#log.error(
      { pid: this.pid, func: this.#jobs.running?.request.func, problem },
      'a worker broke the protocol: killing it; its task ends crashed',
    );
    this.#stopping('protocol');
  }

  #onCancelled(msg: CancelledMessage): void {
    this.#takeBackAsked = false;
    // Only tasks it holds can come back (the one the master counts as running too: the
    // child may not have started it yet, between two tasks): anything else is forged.
    if (!this.#jobs.holdsAll(msg.taskIds)) {
      this.#child.breach('a cancelled frame naming tasks it does not hold');
      return;
    }
    const ids = new Set(msg.taskIds);
    const back = this.#jobs.remove((j) => ids.has(j.taskId));
    if (back.length > 0) this.emit('returned', back);
    this.#afterTasks();
  }

  /** Between tasks: a worker on its way out leaves once it holds nothing. */
  #afterTasks(): void {
    if (this.#phase.name === 'leaving' && this.#jobs.count === 0) this.#retire();
    this.emit('settled');
  }

  #onExit(code: number | null, signal: NodeJS.Signals | null): void {
    const phase = this.#phase;
    const wasUp = phase.name === 'stopping' || phase.name === 'exited' ? phase.wasUp : this.isUp;
    this.#phase = { name: 'exited', killedFor: this.#killedFor, wasUp };
    this.#taskStop.stop();
    const [running, ...waiting] = this.#jobs.takeAll();
    if (running !== undefined) {
      const end = { code, signal, killedFor: this.#killedFor, protocolProblem: this.#protocolProblem };
      running.end(endAtExit(running, end, this.#timeoutOf(running)));
    }
    if (waiting.length > 0) this.emit('returned', waiting);
    this.emit('exit', { code, signal, killedFor: this.#killedFor, wasUp, wasBusy: running !== undefined });
  }
}
