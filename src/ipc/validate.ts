// The master trusts nothing a child sends: task code runs in the child and can write
// anything on its IPC channel (`process.send(null)`) or its results pipe. Every frame and
// every result line is checked here against the protocol (protocol.ts) before the master
// reads a field of it. A frame that does not fit is the worker's fault: the pool kills
// that worker and its running task ends `crashed` (pool/child.ts, pool/slot.ts).
import type { SerializedError } from '../errors.ts';
import type { ChildMessage } from './protocol.ts';
import { checkLimitsFrame } from './task-options.ts';

/** A checked value, or what is wrong with it (said without quoting it). */
export type Checked<T> = { ok: true; value: T } | { ok: false; problem: string };

const bad = (problem: string): { ok: false; problem: string } => ({ ok: false, problem });

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isTaskId(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value > 0;
}

/** An error as it crosses: an object whose name and message are strings (stack and code optional strings). */
function checkError(value: unknown): SerializedError | undefined {
  if (!isObject(value)) return undefined;
  const { name, message, stack, code } = value;
  if (typeof name !== 'string' || typeof message !== 'string') return undefined;
  if (stack !== undefined && typeof stack !== 'string') return undefined;
  if (code !== undefined && typeof code !== 'string') return undefined;
  return {
    name,
    message,
    ...(stack === undefined ? {} : { stack }),
    ...(code === undefined ? {} : { code }),
  };
}

/** A frame on the IPC channel from a child. */
export function checkChildMessage(value: unknown): Checked<ChildMessage> {
  if (!isObject(value)) return bad(`an IPC frame that is not an object (${describeType(value)})`);
  switch (value.type) {
    case 'ready': {
      const { funcs } = value;
      if (!Array.isArray(funcs) || !funcs.every((f) => typeof f === 'string'))
        return bad('a ready frame whose funcs is not an array of names');
      const limits = checkLimitsFrame(value.limits);
      if (!limits.ok) return limits;
      const names = new Set(funcs);
      if (Object.keys(limits.value).some((func) => !names.has(func)))
        return bad('a ready frame with limits for a function it does not name');
      return { ok: true, value: { type: 'ready', funcs: [...funcs], limits: limits.value } };
    }
    case 'load-failed': {
      const error = checkError(value.error);
      if (error === undefined) return bad('a load-failed frame without an error');
      return { ok: true, value: { type: 'load-failed', error } };
    }
    case 'cancelled': {
      const { taskIds } = value;
      if (!Array.isArray(taskIds) || !taskIds.every(isTaskId))
        return bad('a cancelled frame whose taskIds is not an array of task ids');
      return { ok: true, value: { type: 'cancelled', taskIds: [...taskIds] } };
    }
    default:
      return bad(
        typeof value.type === 'string' ? 'an IPC frame of an unknown type' : 'an IPC frame without a type',
      );
  }
}

/**
 * What is wrong with one line of the results pipe (parsed from JSON), or undefined when it
 * is a ResultLine. Checked in place, allocating nothing: this runs for every task.
 */
export function resultLineProblem(value: unknown): string | undefined {
  if (!isObject(value)) return `a result line that is not an object (${describeType(value)})`;
  const { taskId, ok, ranMs, rssBytes } = value;
  if (!isTaskId(taskId)) return 'a result line without a task id';
  if (ranMs !== undefined && !(typeof ranMs === 'number' && Number.isFinite(ranMs) && ranMs >= 0))
    return 'a result line whose ranMs is not a duration';
  if (rssBytes !== undefined && !(typeof rssBytes === 'number' && Number.isFinite(rssBytes) && rssBytes >= 0))
    return 'a result line whose rssBytes is not a size';
  if (ok === true) {
    const { resultJson } = value;
    return resultJson === undefined || typeof resultJson === 'string'
      ? undefined
      : 'a result line whose resultJson is not text';
  }
  if (ok === false)
    return checkError(value.error) === undefined ? 'a failed result line without an error' : undefined;
  return 'a result line whose ok is not true or false';
}

function describeType(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value;
}
