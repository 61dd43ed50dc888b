// Reconnect and respawn delays: capped exponential backoff with full jitter (AWS's
// "Exponential Backoff And Jitter"), so a fleet that lost the broker together does not
// come back together.

export interface BackoffOptions {
  initialMs: number;
  maxMs: number;
}

/** The plain exponential delay of attempt `attempt` (1-based): min(max, initial * 2^(attempt-1)). */
export function exponentialDelay(attempt: number, opts: BackoffOptions): number {
  return Math.min(opts.maxMs, opts.initialMs * 2 ** Math.max(0, attempt - 1));
}

/** The delay before attempt `attempt` (1-based), jittered: uniform in [base/2, base], base = exponentialDelay. */
export function backoffDelay(
  attempt: number,
  opts: BackoffOptions,
  random: () => number = Math.random,
): number {
  const base = exponentialDelay(attempt, opts);
  // Half fixed, half random: never 0 (a tight loop), never past the cap.
  return Math.round(base / 2 + (random() * base) / 2);
}
