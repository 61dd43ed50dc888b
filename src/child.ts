// The worker process: forked by the pool, it loads the task module, says `ready` with the
// names it can run, then runs one task at a time. It never decides its own deadline: the
// master owns it and SIGKILLs a child that runs past it.
import { Worker } from 'node:worker_threads';
import { serializeError } from './errors.ts';
import type { ChildMessage, MasterMessage, RunMessage } from './protocol.ts';
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

/** The running task's controller: one task at a time, so one at most. */
let running: { taskId: number; controller: AbortController } | undefined;

async function runTask(funcs: Map<string, TaskFunction>, msg: RunMessage): Promise<void> {
  const fn = funcs.get(msg.func);
  const controller = new AbortController();
  running = { taskId: msg.taskId, controller };
  try {
    if (fn === undefined) throw new Error(`unknown func ${JSON.stringify(msg.func)}`);
    const value = await runWithTask({ ...msg.info, signal: controller.signal }, () =>
      msg.kwargs === undefined ? fn(...msg.args) : fn(...msg.args, msg.kwargs),
    );
    let resultJson: string | undefined;
    if (msg.wantResult) {
      try {
        resultJson = JSON.stringify(value) ?? 'null';
      } catch (err) {
        throw new Error(`the result cannot be sent as JSON: ${(err as Error).message}`, { cause: err });
      }
    }
    running = undefined;
    send({ type: 'done', taskId: msg.taskId, ok: true, resultJson, rssBytes: process.memoryUsage.rss() });
  } catch (err) {
    running = undefined;
    send({
      type: 'done',
      taskId: msg.taskId,
      ok: false,
      error: serializeError(err),
      rssBytes: process.memoryUsage.rss(),
    });
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
  process.on('message', (msg: MasterMessage) => {
    if (msg.type === 'run') void runTask(funcs, msg);
    else if (msg.type === 'abort' && running?.taskId === msg.taskId) {
      running.controller.abort(new DOMException(msg.reason, 'TimeoutError'));
    }
  });
  send({ type: 'ready', funcs: [...funcs.keys()] });
}

await main();
