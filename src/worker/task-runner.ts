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

  constructor(opts: TaskRunnerOptions) {
    this.#opts = opts;
  }

  /** Resolves once every task handed over so far has run and been reported. */
  get idle(): Promise<void> {
    return this.#pumping ?? Promise.resolve();
  }

  onMessage(msg: MasterMessage): void {
    switch (msg.type) {
      case 'run':
        this.#timeoutMs = msg.timeoutMs;
        this.#rssEachTask = msg.rssEachTask;
        this.#maxResultBytes = msg.maxResultBytes;
        this.#queue.push(...msg.tasks);
        this.#pumping ??= this.#pump().finally(() => {
          this.#pumping = undefined;
        });
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

  /** Runs the queue one task at a time; the master counts on that order for its deadlines. */
  async #pump(): Promise<void> {
    let turnedAt = performance.now();
    for (let task = this.#queue.shift(); task !== undefined; task = this.#queue.shift()) {
      const startedAt = performance.now();
      this.#report(await this.#run(task), startedAt);
      if (this.#queue.length > 0 && performance.now() - turnedAt >= YIELD_EVERY_MS) {
        await new Promise(setImmediate);
        turnedAt = performance.now();
      }
    }
  }

  async #run(task: RunTask): Promise<TaskOutcome> {
    const fn = this.#opts.funcs.get(task.func);
    const controller = new AbortController();
    this.#running = { taskId: task.taskId, controller };
    const context = {
      taskId: task.taskId,
      func: task.func,
      messageId: task.messageId,
      redelivered: task.redelivered === true,
      attempt: task.attempt ?? 1,
      deadline: Date.now() + (task.timeoutMs ?? this.#timeoutMs),
      signal: controller.signal,
      ...(task.traceparent === undefined ? {} : { traceparent: task.traceparent }),
    };
    const withTrace = this.#opts.withTrace;
    try {
      if (fn === undefined) throw new Error(`unknown func ${JSON.stringify(task.func)}`);
      const { args, kwargs } = task.exactJson === undefined ? task : exactArguments(task.exactJson);
      const call = () => (kwargs === undefined ? fn(...args) : fn(...args, kwargs));
      const value = await runWithTask(
        context,
        withTrace === undefined || task.traceparent === undefined
          ? call
          : () => withTrace(task.traceparent as string, task.tracestate, call),
      );
      let resultJson: string | undefined;
      if (task.wantResult === true) {
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
