// The worker process's entry: forked by the pool (pool/child.ts) with the task module's
// URL. It wires the process to a TaskRunner (task-runner.ts): the IPC channel, the
// results pipe, signals and the watchdog; then it loads the task module and says `ready`
// with the names it can run, or `load-failed`. Everything else happens in the runner.
import { writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { serializeError } from '../errors.ts';
import { type ChildMessage, type MasterMessage, RESULTS_FD, type ResultLine } from '../ipc/protocol.ts';
import type { TaskLimits } from '../ipc/task-options.ts';
import { tracingConfig } from '../telemetry/config.ts';
import { collectTaskLimits, loadTaskModule, type TaskFunction } from './task-module.ts';
import { TaskRunner } from './task-runner.ts';

function send(message: ChildMessage): void {
  // Once the master has gone there is nobody to tell; the disconnect handler exits. The
  // callback keeps a failed write (EPIPE) from becoming an uncaught 'error' event.
  if (process.connected) process.send?.(message, undefined, {}, () => {});
}

/**
 * One line on the results pipe, written synchronously: when this returns it is in the
 * kernel. The pipe is blocking on this side: a write waits while the master's end is
 * full, and returns short only if a signal interrupts it.
 */
function writeResult(line: ResultLine): void {
  const text = `${JSON.stringify(line)}\n`;
  try {
    // A string first (no Buffer of our own on the per-task path); the rest of a short write as bytes.
    const written = writeSync(RESULTS_FD, text);
    if (written < Buffer.byteLength(text)) {
      const bytes = Buffer.from(text);
      for (let at = written; at < bytes.length; ) at += writeSync(RESULTS_FD, bytes, at);
    }
  } catch {
    // The master has gone (EPIPE): nobody to tell; the disconnect handler exits.
  }
}

/**
 * A child must not outlive its master, even while a task spins in a busy loop that keeps
 * this thread from ever seeing 'disconnect'. A watchdog thread has an event loop of its
 * own: when the parent is gone (we are re-parented), it kills the whole process.
 *
 * It stands down once this thread has begun to exit (the 'disconnect' handler below does
 * so when the parent goes): a SIGKILL in the middle of an orderly exit would cut short
 * what the exit writes (V8's coverage file under NODE_V8_COVERAGE), for no gain.
 */
function startOrphanWatchdog(): void {
  const exiting = new Int32Array(new SharedArrayBuffer(4));
  process.once('exit', () => Atomics.store(exiting, 0, 1));
  const watchdog = new Worker(
    `const { workerData } = require('node:worker_threads');
     setInterval(() => {
       if (process.ppid !== workerData.ppid && Atomics.load(workerData.exiting, 0) === 0) {
         process.kill(process.pid, 'SIGKILL');
       }
     }, 250);`,
    { eval: true, workerData: { ppid: process.ppid, exiting }, stdout: false, stderr: false },
  );
  watchdog.unref();
}

/**
 * Task code cannot signal the master through process.kill: a SIGTERM from a task would
 * otherwise read as an operator's drain and stop the service with exit 0 (and compose
 * would leave it down). A guard against the easy mistake, not a sandbox: a task that runs
 * `kill` in a shell is not stopped by it.
 */
function guardMaster(): void {
  const master = process.ppid;
  const kill = process.kill.bind(process);
  process.kill = ((pid: number, signal?: string | number) => {
    if (pid === master || pid === -master) {
      const err = new Error(`kill EPERM: a task may not signal the service's master (pid ${master})`);
      throw Object.assign(err, { code: 'EPERM', syscall: 'kill' });
    }
    return kill(pid, signal);
  }) as typeof process.kill;
}

async function main(): Promise<void> {
  const moduleUrl = process.argv[2];
  if (moduleUrl === undefined || process.send === undefined) {
    console.error('worker/entry.ts is started by the pool with child_process.fork, not by hand');
    process.exit(2);
  }
  // Tracing on (OTEL_*): the task's own spans are exported, and flushed before an exit.
  // The master checked these variables at start-up; a child never fails on them.
  let tracingOn: ReturnType<typeof tracingConfig>;
  try {
    tracingOn = tracingConfig(process.env);
  } catch {
    tracingOn = undefined;
  }
  const tracing =
    tracingOn === undefined
      ? undefined
      : await import('../telemetry/child.ts').then((m) => m.registerChildTracing(tracingOn));
  process.on('disconnect', () => {
    if (tracing === undefined) process.exit(0);
    else void tracing.flush(1_000).finally(() => process.exit(0));
  });
  // Ctrl-C in a terminal signals the whole process group. The master drains on it and
  // lets running tasks finish, so the children must not die of it; the master stops them.
  process.on('SIGINT', () => {});
  process.on('SIGTERM', () => {});
  startOrphanWatchdog();
  guardMaster();

  let funcs: Map<string, TaskFunction>;
  let limits: Record<string, TaskLimits>;
  try {
    funcs = await loadTaskModule(moduleUrl);
    if (funcs.size === 0) throw new Error('the module exports no functions');
    limits = collectTaskLimits(funcs);
  } catch (err) {
    send({ type: 'load-failed', error: serializeError(err) });
    process.disconnect();
    return;
  }
  const runner = new TaskRunner({
    funcs,
    send,
    writeResult,
    rss: () => process.memoryUsage.rss(),
    ...(tracing === undefined ? {} : { withTrace: tracing.within }),
  });
  process.on('message', (msg: MasterMessage) => runner.onMessage(msg));
  send({ type: 'ready', funcs: [...funcs.keys()], limits });
}

await main();
