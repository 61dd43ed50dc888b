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

export type MasterMessage = RunMessage;

export interface ReadyMessage {
  type: 'ready';
  funcs: string[];
}

export interface LoadFailedMessage {
  type: 'load-failed';
  error: SerializedError;
}

export type DoneMessage =
  | { type: 'done'; taskId: number; ok: true; resultJson: string | undefined }
  | { type: 'done'; taskId: number; ok: false; error: SerializedError };

export type ChildMessage = ReadyMessage | LoadFailedMessage | DoneMessage;
