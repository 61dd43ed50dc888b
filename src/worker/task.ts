// The typed form of per-task options: `export const resize = task({ timeout: 120 }, async (path) => ...)`
// is `resize.options = { timeout: 120 }` with the names and types checked by the compiler
// and the values checked at once (the child checks them again when it loads the module).
import { checkTaskOptions, type TaskOptions } from '../ipc/task-options.ts';

export type { TaskOptions } from '../ipc/task-options.ts';

export function task<F extends (...args: never[]) => unknown>(
  options: TaskOptions,
  fn: F,
): F & { options: TaskOptions } {
  const checked = checkTaskOptions(fn.name === '' ? 'anonymous' : fn.name, options);
  if (!checked.ok) throw new TypeError(checked.problem);
  return Object.assign(fn, { options });
}
