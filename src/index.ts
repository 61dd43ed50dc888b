// The package's public face for task modules and programs that embed the service.

export {
  type AnyTasks,
  type CallOptions,
  Client,
  ClientError,
  type ClientErrorCode,
  type ClientOptions,
  createClient,
  type FailureKind,
  type SendOptions,
  type TaskArgs,
  TaskCallError,
  type TaskModule,
  type TaskName,
  type TaskResult,
} from './client.ts';
export type { Config } from './config.ts';
export { parseConfig } from './config.ts';
export { ServiceError } from './errors.ts';
export { Service } from './service.ts';
export { currentTask, type TaskInfo } from './task-context.ts';
