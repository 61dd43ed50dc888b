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

/** The time (ms since the epoch, sub-millisecond) at which the task started. */
export function stamp(): number {
  return performance.timeOrigin + performance.now();
}
