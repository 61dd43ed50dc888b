// The package's public face for task modules and programs that embed the service.

export { Client, createClient } from './client/client.ts';
// Every type of client/types.ts is public: the module holds only the producer's types.
export type * from './client/types.ts';
export type { Config } from './config/option-table.ts';
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
