// The worker process: forked by the pool, it loads the task module, says `ready` with the
// names it can run, then runs one task at a time. It never decides its own deadline: the
// master owns it and SIGKILLs a child that runs past it.
import { writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { serializeError } from './errors.ts';
import {
  type ChildMessage,
  type MasterMessage,
  RESULTS_FD,
  type ResultLine,
  type RunTask,
  type TaskOutcome,
} from './protocol.ts';
import { runWithTask } from './task-context.ts';
import { loadTaskModule, type TaskFunction } from './task-module.ts';

function send(message: ChildMessage): void {
  // Once the master has gone there is nobody to tell; the disconnect handler exits. The
  // callback keeps a failed write (EPIPE) from becoming an uncaught 'error' event.
  if (process.connected) process.send?.(message, undefined, {}, () => {});
}

/**
 * A child must not outlive its master, even while a task spins in a busy loop that keeps
 * this thread from ever seeing 'disconnect'. A watchdog thread has an event loop of its
 * own: when the parent is gone (we are re-parented), it kills the whole process.
 */
function startOrphanWatchdog(): void {
  const watchdog = new Worker(
    `const { workerData } = require('node:worker_threads');
     setInterval(() => {
       if (process.ppid !== workerData.ppid) process.kill(process.pid, 'SIGKILL');
     }, 250);`,
    { eval: true, workerData: { ppid: process.ppid }, stdout: false, stderr: false },
  );
  watchdog.unref();
}

/** Tasks handed over and not started yet, in order. */
const queue: RunTask[] = [];
/** The running task, one at most. */
let running: { taskId: number; controller: AbortController } | undefined;
let timeoutMs = 0;
let rssEachTask = false;
/** Without a memory limit the memory is read at most this often: reading it is a syscall or three. */
const RSS_EVERY_MS = 1_000;
let rssReportedAt = Number.NEGATIVE_INFINITY;

/**
 * Each result is written, synchronously, before the next task starts: a task that kills
 * the process (process.exit, a native crash) or hangs until the master kills it must not
 * take the results of the tasks before it along, or the master would count finished
 * tasks as crashed, and start the next task's clock late. A synchronous write to a pipe
 * is in the kernel when it returns; the master reads many lines per read.
 */
function report(outcome: TaskOutcome, startedAt: number): void {
  const now = performance.now();
  const line: ResultLine = outcome;
  line.ranMs = Math.round((now - startedAt) * 1000) / 1000;
  if (rssEachTask || now - rssReportedAt >= RSS_EVERY_MS) {
    line.rssBytes = process.memoryUsage.rss();
    rssReportedAt = now;
  }
  const text = `${JSON.stringify(line)}\n`;
  try {
    // The pipe is blocking on this side: a write waits while the master's end is full,
    // and returns short only if a signal interrupts it.
    const written = writeSync(RESULTS_FD, text);
    if (written < Buffer.byteLength(text)) writeRest(Buffer.from(text), written);
  } catch {
    // The master has gone (EPIPE): nobody to tell; the disconnect handler exits.
  }
}

function writeRest(bytes: Buffer, from: number): void {
  for (let at = from; at < bytes.length; ) at += writeSync(RESULTS_FD, bytes, at);
}

async function runTask(funcs: Map<string, TaskFunction>, task: RunTask): Promise<TaskOutcome> {
  const fn = funcs.get(task.func);
  const controller = new AbortController();
  running = { taskId: task.taskId, controller };
  const context = {
    taskId: task.taskId,
    func: task.func,
    messageId: task.messageId,
    redelivered: task.redelivered,
    attempt: task.attempt,
    deadline: Date.now() + timeoutMs,
    signal: controller.signal,
  };
  try {
    if (fn === undefined) throw new Error(`unknown func ${JSON.stringify(task.func)}`);
    const value = await runWithTask(context, () =>
      task.kwargs === undefined ? fn(...task.args) : fn(...task.args, task.kwargs),
    );
    let resultJson: string | undefined;
    if (task.wantResult) {
      try {
        resultJson = JSON.stringify(value) ?? 'null';
      } catch (err) {
        throw new Error(`the result cannot be sent as JSON: ${(err as Error).message}`, { cause: err });
      }
    }
    return { taskId: task.taskId, ok: true, resultJson };
  } catch (err) {
    return { taskId: task.taskId, ok: false, error: serializeError(err) };
  } finally {
    running = undefined;
  }
}

/**
 * How long a backlog of synchronous tasks may run before the child lets its event loop
 * turn: a `cancel` from the master (a drain, a dead channel, a worker leaving) is a
 * message that waits for that turn, and must not wait for the whole backlog.
 */
const YIELD_EVERY_MS = 2;

/** Runs the queue one task at a time; the master counts on that order for its deadlines. */
let pumping = false;
async function pump(funcs: Map<string, TaskFunction>): Promise<void> {
  if (pumping) return;
  pumping = true;
  let turnedAt = performance.now();
  for (let task = queue.shift(); task !== undefined; task = queue.shift()) {
    const startedAt = performance.now();
    report(await runTask(funcs, task), startedAt);
    if (queue.length > 0 && performance.now() - turnedAt >= YIELD_EVERY_MS) {
      await new Promise(setImmediate);
      turnedAt = performance.now();
    }
  }
  pumping = false;
}

function onMessage(funcs: Map<string, TaskFunction>, msg: MasterMessage): void {
  switch (msg.type) {
    case 'run':
      timeoutMs = msg.timeoutMs;
      rssEachTask = msg.rssEachTask;
      queue.push(...msg.tasks);
      void pump(funcs);
      return;
    case 'abort':
      if (running?.taskId === msg.taskId)
        running.controller.abort(new DOMException(msg.reason, 'TimeoutError'));
      return;
    case 'cancel':
      send({ type: 'cancelled', taskIds: queue.splice(0).map((t) => t.taskId) });
      return;
  }
}

async function main(): Promise<void> {
  const moduleUrl = process.argv[2];
  if (moduleUrl === undefined || process.send === undefined) {
    console.error('child.ts is started by the pool with child_process.fork, not by hand');
    process.exit(2);
  }
  process.on('disconnect', () => process.exit(0));
  // Ctrl-C in a terminal signals the whole process group. The master drains on it and
  // lets running tasks finish, so the children must not die of it; the master stops them.
  process.on('SIGINT', () => {});
  process.on('SIGTERM', () => {});
  startOrphanWatchdog();

  let funcs: Map<string, TaskFunction>;
  try {
    funcs = await loadTaskModule(moduleUrl);
    if (funcs.size === 0) throw new Error('the module exports no functions');
  } catch (err) {
    send({ type: 'load-failed', error: serializeError(err) });
    process.disconnect();
    return;
  }
  process.on('message', (msg: MasterMessage) => onMessage(funcs, msg));
  send({ type: 'ready', funcs: [...funcs.keys()] });
}

await main();
