// The package's public face for task modules and programs that embed the service.

export { Client, type ClientOptions, createClient, TaskCallError } from './client.ts';
export type { Config } from './config.ts';
export { parseConfig } from './config.ts';
export { ServiceError } from './errors.ts';
export { Service } from './service.ts';
export { currentTask, type TaskInfo } from './task-context.ts';
