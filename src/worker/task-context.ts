// What a running task can learn about its delivery, without changing its signature:
//
//   import { currentTask } from 'amqp-concurrency';
//   export async function charge(orderId) {
//     if (currentTask()?.redelivered) { /* check whether it was charged already */ }
//   }
//
// The storage hangs off a global symbol, so that a task module that imports another copy
// of this package (its own node_modules) still sees the context the worker set.
import { AsyncLocalStorage } from 'node:async_hooks';
import type { TaskInfo } from '../ipc/protocol.ts';

export type { TaskInfo };

/** What a task sees: its delivery, and a signal that fires at the time limit (with --kill-grace). */
export interface TaskContext extends TaskInfo {
  /** Aborted when the task reaches --worker-timeout; it then has --kill-grace seconds to stop. */
  signal: AbortSignal;
}

const KEY = Symbol.for('amqp-concurrency.task-context');
const holder = globalThis as { [KEY]?: AsyncLocalStorage<TaskContext> };
const storage: AsyncLocalStorage<TaskContext> = holder[KEY] ?? new AsyncLocalStorage<TaskContext>();
holder[KEY] = storage;

/** The delivery the calling task runs for, or undefined outside a task. */
export function currentTask(): TaskContext | undefined {
  return storage.getStore();
}

export function runWithTask<T>(context: TaskContext, fn: () => T): T {
  return storage.run(context, fn);
}
