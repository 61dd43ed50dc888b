// The IPC between the master and a worker child: one union per direction, discriminated
// by `type`, with a `taskId` on every task message. This is the only shape that crosses.
import type { SerializedError } from './errors.ts';

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
}

export interface RunMessage {
  type: 'run';
  taskId: number;
  func: string;
  args: unknown[];
  kwargs: Record<string, unknown> | undefined;
  info: TaskInfo;
  /** Only serialise the result when someone (reply_to) will read it. */
  wantResult: boolean;
}

/** The soft time limit: the task's AbortSignal fires; the master kills it after the grace. */
export interface AbortMessage {
  type: 'abort';
  taskId: number;
  reason: string;
}

export type MasterMessage = RunMessage | AbortMessage;

export interface ReadyMessage {
  type: 'ready';
  funcs: string[];
}

export interface LoadFailedMessage {
  type: 'load-failed';
  error: SerializedError;
}

/** `rssBytes`: the child's resident memory after the task, for --max-worker-memory and /status. */
export type DoneMessage =
  | { type: 'done'; taskId: number; ok: true; resultJson: string | undefined; rssBytes: number }
  | { type: 'done'; taskId: number; ok: false; error: SerializedError; rssBytes: number };

export type ChildMessage = ReadyMessage | LoadFailedMessage | DoneMessage;
