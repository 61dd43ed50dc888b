// How many tasks a worker may hold: the running one, the next (so that it starts the
// moment the running one ends), and more only while they are tiny. The slot asks it for
// itself, and the scheduler for how long a running task may be before it counts as long.

/** A running task older than this takes no pipeline of short tasks behind it (at most the next). */
export const LONG_TASK_MS = 5;

/**
 * Whether a worker holding `load` tasks (its running one started `ranMs` ago; undefined:
 * none has started) may hold one more, at most `depth` in all. The next task always, so
 * that it starts the moment the running one ends, unless that one has run `longMs` and
 * turned out long (another worker will likely be free sooner); more only while the
 * running one is short, as tiny tasks are.
 */
export function mayHoldMore(load: number, depth: number, ranMs: number | undefined, longMs: number): boolean {
  if (load === 0) return true;
  if (load >= depth) return false;
  if (ranMs === undefined) return true;
  if (load === 1) return ranMs < longMs;
  return ranMs < LONG_TASK_MS;
}
