// What the child does with the master's messages: runs the tasks it is handed one at a
// time, in order, and reports each result before the next starts. It holds no process
// state of its own: its `send` (the IPC channel) and its result writer (the results
// pipe) are given to it, so it runs in a test as it runs in the child (entry.ts). It never
// decides a deadline: the master owns it and SIGKILLs a child that runs past it.
import { serializeError } from '../errors.ts';
import { parseExact, stringifyExact } from '../ipc/exact-json.ts';
import type { ChildMessage, MasterMessage, ResultLine, RunTask, TaskOutcome } from '../ipc/protocol.ts';
import { runWithTask } from './task-context.ts';
import type { TaskFunction } from './task-module.ts';

export interface TaskRunnerOptions {
  funcs: ReadonlyMap<string, TaskFunction>;
  /** A message to the master over IPC. */
  send: (message: ChildMessage) => void;
  /**
   * Writes one result line, synchronously: a task that kills the process (process.exit,
   * a native crash) or hangs until the master kills it must not take the results of the
   * tasks before it along, or the master would count finished tasks as crashed.
   */
  writeResult: (line: ResultLine) => void;
  /** The process's resident memory, reported with a result now and then. */
  rss?: () => number;
  /** Runs a task inside its span's context, when tracing is on (telemetry/child.ts). */
  withTrace?: <T>(traceparent: string, tracestate: string | undefined, fn: () => T) => T;
}

/** Without a memory limit the memory is read at most this often: reading it is a syscall or three. */
const RSS_EVERY_MS = 1_000;

/**
 * How long a backlog of synchronous tasks may run before the runner lets its event loop
 * turn: a `cancel` from the master (a drain, a dead channel, a worker leaving) is a
 * message that waits for that turn, and must not wait for the whole backlog.
 */
const YIELD_EVERY_MS = 2;

/** The arguments the master sent as exact JSON (integers past 2^53 in them). */
function exactArguments(text: string): { args: unknown[]; kwargs: Record<string, unknown> | undefined } {
  const parsed = parseExact(text);
  if (!parsed.ok) throw new Error(parsed.reason);
  return parsed.value as { args: unknown[]; kwargs: Record<string, unknown> | undefined };
}

/** A value an `await` would wait on: a promise, or any object or function with a `then` method. */
function isThenable(value: unknown): value is PromiseLike<unknown> {
  return (
    (typeof value === 'object' || typeof value === 'function') &&
    value !== null &&
    typeof (value as { then?: unknown }).then === 'function'
  );
}

export class TaskRunner {
  readonly #opts: TaskRunnerOptions;
  /** Tasks handed over and not started yet, in order. */
  readonly #queue: RunTask[] = [];
  /** The running task, one at most. */
  #running: { taskId: number; controller: AbortController } | undefined;
  #timeoutMs = 0;
  #rssEachTask = false;
  #maxResultBytes = Number.POSITIVE_INFINITY;
  #rssReportedAt = Number.NEGATIVE_INFINITY;
  #pumping: Promise<void> | undefined;
  /**
   * Whether #pump is inside its loop. Cleared by the loop itself as it ends, not a turn
   * later: a run of plain-value tasks can finish the loop without an await, and tasks
   * handed over in the same turn (two frames in one read) must start a new pump.
   */
  #pumpLooping = false;

  constructor(opts: TaskRunnerOptions) {
    this.#opts = opts;
  }

  /** Resolves once every task handed over so far has run and been reported. */
  get idle(): Promise<void> {
    return (this.#pumpLooping ? this.#pumping : undefined) ?? Promise.resolve();
  }

  onMessage(msg: MasterMessage): void {
    switch (msg.type) {
      case 'run':
        this.#timeoutMs = msg.timeoutMs;
        this.#rssEachTask = msg.rssEachTask;
        this.#maxResultBytes = msg.maxResultBytes;
        this.#queue.push(...msg.tasks);
        if (!this.#pumpLooping) this.#pumping = this.#pump();
        return;
      case 'abort':
        if (this.#running?.taskId === msg.taskId)
          this.#running.controller.abort(
            new DOMException(msg.reason, msg.cancel === true ? 'AbortError' : 'TimeoutError'),
          );
        return;
      case 'cancel':
        this.#opts.send({ type: 'cancelled', taskIds: this.#queue.splice(0).map((t) => t.taskId) });
        return;
    }
  }

  /**
   * Runs the queue one task at a time; the master counts on that order for its deadlines.
   * A task that returns a plain value is reported without an await: two promise turns per
   * task were a tenth of a worker's CPU for tiny tasks. What such a task queued as
   * microtasks runs at the next await or yield, as it would after any synchronous code.
   */
  async #pump(): Promise<void> {
    this.#pumpLooping = true;
    try {
      let turnedAt = performance.now();
      for (let task = this.#queue.shift(); task !== undefined; task = this.#queue.shift()) {
        const startedAt = performance.now();
        const outcome = this.#run(task);
        this.#report(outcome instanceof Promise ? await outcome : outcome, startedAt);
        if (this.#queue.length > 0 && performance.now() - turnedAt >= YIELD_EVERY_MS) {
          await new Promise(setImmediate);
          turnedAt = performance.now();
        }
      }
    } finally {
      this.#pumpLooping = false;
    }
  }

  /** One task: its outcome, at once when its function returned a plain value. */
  #run(task: RunTask): TaskOutcome | Promise<TaskOutcome> {
    const fn = this.#opts.funcs.get(task.func);
    const controller = new AbortController();
    this.#running = { taskId: task.taskId, controller };
    const context = {
      taskId: task.taskId,
      func: task.func,
      messageId: task.messageId,
      redelivered: task.redelivered,
      attempt: task.attempt,
      deadline: Date.now() + (task.timeoutMs ?? this.#timeoutMs),
      signal: controller.signal,
      ...(task.traceparent === undefined ? {} : { traceparent: task.traceparent }),
    };
    const withTrace = this.#opts.withTrace;
    let value: unknown;
    try {
      if (fn === undefined) throw new Error(`unknown func ${JSON.stringify(task.func)}`);
      const { args, kwargs } = task.exactJson === undefined ? task : exactArguments(task.exactJson);
      const call = () => (kwargs === undefined ? fn(...args) : fn(...args, kwargs));
      value = runWithTask(
        context,
        withTrace === undefined || task.traceparent === undefined
          ? call
          : () => withTrace(task.traceparent as string, task.tracestate, call),
      );
    } catch (err) {
      this.#running = undefined;
      return { taskId: task.taskId, ok: false, error: serializeError(err) };
    }
    if (isThenable(value)) {
      return Promise.resolve(value).then(
        (settled) => this.#outcome(task, settled),
        (err: unknown) => this.#outcome(task, undefined, err),
      );
    }
    return this.#outcome(task, value);
  }

  /** The outcome of a task that returned `value` (or threw `err`, when given): its result checked. */
  #outcome(task: RunTask, value: unknown, ...thrown: [unknown?]): TaskOutcome {
    try {
      if (thrown.length > 0) throw thrown[0];
      let resultJson: string | undefined;
      if (task.wantResult) {
        try {
          resultJson = stringifyExact(value) ?? 'null';
        } catch (err) {
          throw new Error(`the result cannot be sent as JSON: ${(err as Error).message}`, { cause: err });
        }
        // Past the limit the reply could not be published (the broker refuses a message
        // over its max_message_size) and would only fill the master's memory.
        const bytes = Buffer.byteLength(resultJson);
        if (bytes > this.#maxResultBytes)
          throw new Error(
            `the result is ${bytes} bytes of JSON, over the limit of ${this.#maxResultBytes} (--max-result-bytes)`,
          );
      }
      return { taskId: task.taskId, ok: true, resultJson };
    } catch (err) {
      return { taskId: task.taskId, ok: false, error: serializeError(err) };
    } finally {
      this.#running = undefined;
    }
  }

  #report(outcome: TaskOutcome, startedAt: number): void {
    const now = performance.now();
    const line: ResultLine = outcome;
    line.ranMs = Math.round((now - startedAt) * 1000) / 1000;
    const rss = this.#opts.rss;
    if (rss !== undefined && (this.#rssEachTask || now - this.#rssReportedAt >= RSS_EVERY_MS)) {
      line.rssBytes = rss();
      this.#rssReportedAt = now;
    }
    this.#opts.writeResult(line);
  }
}
