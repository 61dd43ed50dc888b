// The IPC between the master and a worker child: one union per direction, discriminated
// by `type`; every task carries its `taskId`. This is the only shape that crosses.
//
// Tasks travel in batches: the master may hand a child several short tasks in one message
// (the child runs them one at a time, in order). Each crossing is a write on a pipe, and
// for tiny tasks those writes, not the tasks, are what cost.
//
// Results do not take the IPC channel: each is one JSON line on a pipe of its own
// (RESULTS_FD), written synchronously before the next task starts (see child.ts), and the
// master parses all the lines of one read at once.
import type { SerializedError } from '../errors.ts';
import type { TaskLimits } from './task-options.ts';

/** What a task may learn about the delivery it runs for (see task-context.ts). */
export interface TaskInfo {
  taskId: number;
  func: string;
  messageId: string | undefined;
  redelivered: boolean;
  /** 1 for the first run of this message; more when it is retried. */
  attempt: number;
  /** Wall-clock time (ms since the epoch) at which the master kills the task. */
  deadline: number;
  /** The W3C traceparent of the task's span, when tracing is on (README "Tracing"). */
  traceparent?: string;
}

export interface RunTask {
  taskId: number;
  func: string;
  args: unknown[];
  kwargs: Record<string, unknown> | undefined;
  messageId: string | undefined;
  /**
   * These three are sent only when they differ from the usual (false, 1, false): a
   * hand-over of tiny tasks is written and parsed for every task, and the frame was
   * half made of them.
   */
  redelivered?: boolean;
  attempt?: number;
  /** Only serialise the result when someone (reply_to) will read it. */
  wantResult?: boolean;
  /** Its own time limit, when its function declares one (else the run message's). */
  timeoutMs?: number;
  /** The task's span, when tracing is on: the task runs in its context. */
  traceparent?: string;
  tracestate?: string;
  /**
   * Set when the arguments hold integers past 2^53 (BigInt, which the IPC's JSON cannot
   * carry): `{"args": [...], "kwargs": {...}}` written exactly (exact-json.ts); `args`
   * and `kwargs` are then empty, and the child reads them from here.
   */
  exactJson?: string;
}

/** Tasks to run in order, after any the child already has. */
export interface RunMessage {
  type: 'run';
  tasks: RunTask[];
  /** The time limit, for the deadline a task can read; the master enforces it. */
  timeoutMs: number;
  /** Report the memory after every task (a memory limit is set), not only now and then. */
  rssEachTask: boolean;
  /** The largest result, in bytes of JSON, a task may return for a reply (--max-result-bytes). */
  maxResultBytes: number;
}

/** The soft time limit or a cancel: the task's AbortSignal fires; the master kills it after the grace. */
export interface AbortMessage {
  type: 'abort';
  taskId: number;
  reason: string;
  /** An operator's cancel (the signal's reason is an AbortError), not the time limit (a TimeoutError). */
  cancel?: boolean;
}

/** Drop every task not yet started (they go back to the master's queue). */
export interface CancelMessage {
  type: 'cancel';
}

export type MasterMessage = RunMessage | AbortMessage | CancelMessage;

export interface ReadyMessage {
  type: 'ready';
  funcs: string[];
  /** The options the functions declare (`fn.options`), checked, by name; only those that declare any. */
  limits?: Record<string, TaskLimits>;
}

export interface LoadFailedMessage {
  type: 'load-failed';
  error: SerializedError;
}

export type TaskOutcome =
  | { taskId: number; ok: true; resultJson: string | undefined }
  | { taskId: number; ok: false; error: SerializedError };

/** The child's file descriptor for results: fork's stdio[4], a pipe to the master. */
export const RESULTS_FD = 4;

/**
 * One line on the results pipe. `ranMs`: how long the task ran, by the child's clock.
 * `rssBytes`: the child's memory after the task, when it says.
 */
export type ResultLine = TaskOutcome & { ranMs?: number; rssBytes?: number };

export interface CancelledMessage {
  type: 'cancelled';
  taskIds: number[];
}

export type ChildMessage = ReadyMessage | LoadFailedMessage | CancelledMessage;
