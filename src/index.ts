// The package's public face for task modules and programs that embed the service.

export {
  type AnyTasks,
  type CallOptions,
  Client,
  type ClientOptions,
  createClient,
  type SendManyOptions,
  type SendOptions,
  type TaskArgs,
  type TaskItem,
  type TaskModule,
  type TaskName,
  type TaskResult,
} from './client/client.ts';
export type { Config } from './config/options.ts';
export { parseConfig } from './config/options.ts';
export {
  ClientError,
  type ClientErrorCode,
  type ErrorCode,
  type FailureKind,
  SendManyError,
  ServiceError,
  TaskCallError,
} from './errors.ts';
export { Service } from './service/service.ts';
export { type TaskOptions, task } from './worker/task.ts';
export { currentTask, type TaskContext, type TaskInfo } from './worker/task-context.ts';
