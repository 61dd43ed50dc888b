// Finding and loading the task module. The master only resolves the path (it never runs
// user code); the children import it and list what can be called.
import { existsSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ServiceError } from '../errors.ts';
import { checkTaskOptions, type TaskLimits } from '../ipc/task-options.ts';

const INDEX_FILES = ['index.ts', 'index.mts', 'index.js', 'index.mjs', 'index.cjs'];

/**
 * Turns --task-path into a file URL: a file, a folder with an index file, or a package
 * name resolvable from `cwd`. The Python tool took a module path like `tasks`, so a bare
 * name is tried as a folder or file below cwd before it is tried as a package.
 */
export function resolveTaskModule(taskPath: string, cwd: string): string {
  const candidates = [taskPath, `${taskPath}.ts`, `${taskPath}.js`, `${taskPath}.mjs`];
  for (const candidate of candidates) {
    const full = resolve(cwd, candidate);
    if (!existsSync(full)) continue;
    if (statSync(full).isFile()) return pathToFileURL(full).href;
    if (statSync(full).isDirectory()) {
      for (const index of INDEX_FILES) {
        const file = resolve(full, index);
        if (existsSync(file)) return pathToFileURL(file).href;
      }
      throw new ServiceError(
        'ERR_CONFIG',
        `--task-path: folder ${JSON.stringify(taskPath)} has no index file (${INDEX_FILES.join(', ')})`,
      );
    }
  }
  try {
    return pathToFileURL(createRequire(resolve(cwd, 'noop.js')).resolve(taskPath)).href;
  } catch {
    throw new ServiceError(
      'ERR_CONFIG',
      `--task-path: no file, folder or package ${JSON.stringify(taskPath)}`,
    );
  }
}

/** Names that are never callable, whatever the module exports. */
const FORBIDDEN = new Set(['default', 'constructor', '__proto__', 'prototype', 'then']);

function isCallableName(name: string): boolean {
  return !FORBIDDEN.has(name) && !name.includes('.');
}

export type TaskFunction = (...args: unknown[]) => unknown;

/**
 * The module's own exported functions. A CommonJS module's exports arrive as `default`:
 * its own function properties count as exports too (never inherited ones).
 */
export function collectTaskFunctions(namespace: Record<string, unknown>): Map<string, TaskFunction> {
  const funcs = new Map<string, TaskFunction>();
  for (const name of Object.keys(namespace)) {
    const value = namespace[name];
    if (isCallableName(name) && typeof value === 'function') funcs.set(name, value as TaskFunction);
  }
  const cjs = namespace.default;
  if (typeof cjs === 'object' && cjs !== null && !Array.isArray(cjs)) {
    for (const name of Object.keys(cjs)) {
      const value = (cjs as Record<string, unknown>)[name];
      if (isCallableName(name) && !funcs.has(name) && typeof value === 'function') {
        funcs.set(name, value as TaskFunction);
      }
    }
  }
  return funcs;
}

export async function loadTaskModule(url: string): Promise<Map<string, TaskFunction>> {
  const namespace = (await import(url)) as Record<string, unknown>;
  return collectTaskFunctions(namespace);
}

/**
 * The options each function declares as its own `options` property (README "Per-task
 * options"), checked: the first invalid one throws, naming the function and the option,
 * and the module then fails to load (exit code 2 at start-up; a reload keeps the old code).
 */
export function collectTaskLimits(funcs: ReadonlyMap<string, TaskFunction>): Record<string, TaskLimits> {
  const limits: Record<string, TaskLimits> = {};
  for (const [name, fn] of funcs) {
    if (!Object.hasOwn(fn, 'options')) continue;
    const checked = checkTaskOptions(name, (fn as { options?: unknown }).options);
    if (!checked.ok) {
      // One line says it all (the function and the option): no stack into our own code.
      const err = new Error(checked.problem);
      err.stack = undefined;
      throw err;
    }
    limits[name] = checked.value;
  }
  return limits;
}
