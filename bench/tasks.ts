// Tasks for the benchmark.

/** Does nothing: what is left is the cost of moving the task. */
export function noop(): null {
  return null;
}

/** Spins for `ms` milliseconds: CPU-bound work of a known size. */
export function burn(ms: number): null {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // busy
  }
  return null;
}

/**
 * The time at which the task started, in ms on the system's monotonic clock: the one
 * clock every process on the machine reads alike, so the bench can subtract its own
 * send stamp from it. `performance.timeOrigin + performance.now()` is not that: each
 * process fixes its origin from the wall clock when it starts, and processes started
 * at different moments were seen to disagree by about a millisecond (docs/benchmarks.md,
 * twenty-second pass), the size of the latency goal.
 */
export function stamp(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}
