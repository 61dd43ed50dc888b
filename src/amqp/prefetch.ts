// The prefetch policy, all of it: its bounds, the default, the automatic window, the
// window after a resize, and how many acks make a flush worth it.
//
// When none is given (README "Options": chosen by measurement, never unbounded), it is sized
// by the measured task duration so that an instance holds about HOLD_MS of work per
// worker. Tiny tasks need a deep window (a few hundred deliveries) to keep the master,
// the children and the broker all busy; long tasks need a shallow one, or one instance
// sits on messages another could run. One fixed number cannot be both.
//
// It starts at the safe default (defaultPrefetch) until tasks have been timed, then
// follows the pool's moving average; with a memory budget, never past what fits in it at
// the average body, or at the largest body accepted until one is seen. When it shrinks,
// the deliveries received beyond the new window that have not been handed to a worker go
// back to the queue: basic.qos never takes back what was delivered, and a burst of long
// tasks after tiny ones would otherwise keep hundreds of messages waiting here, past
// RabbitMQ's consumer_timeout.
import type { Logger } from 'pino';

/** The most deliveries one instance holds at once, however the prefetch is chosen. */
export const MAX_PREFETCH = 1_000;

/**
 * The prefetch to start with when none is given, before any task has been timed: enough
 * deliveries waiting in the master that a worker finishing a task finds the next one at
 * once, bounded so that one instance does not hoard messages that another instance could
 * run. From then on it follows the task duration (autoPrefetch).
 */
export function defaultPrefetch(workers: number): number {
  return Math.min(MAX_PREFETCH, workers * 32);
}

/** A fixed prefetch after a resize: the deliveries per worker it started with, kept. */
export function resizedPrefetch(prefetch: number, workersBefore: number, workersNow: number): number {
  return Math.max(1, Math.min(MAX_PREFETCH, Math.round((prefetch / workersBefore) * workersNow)));
}

/** A fixed prefetch's share per worker (rounded up), for the longest a delivery can wait. */
export function perWorkerShare(prefetch: number, workers: number): number {
  return Math.ceil(prefetch / workers);
}

/** Acks waiting that make a flush worth it at once: a quarter of the window (256 when unlimited). */
export function ackFlushThreshold(prefetch: number): number {
  return prefetch > 0 ? Math.max(1, Math.floor(prefetch / 4)) : 256;
}

/** The work, in milliseconds at the average duration, one worker may have waiting here. */
export const HOLD_MS = 1_000;
/**
 * The most one worker's share may be (MAX_PREFETCH bounds them all). It binds only for
 * tasks under about 4 ms. More would feed tiny tasks faster (384 about 4%, 500 about 9%
 * on 2 workers), but each delivery then waits longer in the master, more of them outlive
 * two scavenges, and the master's RSS grows with the task count: at 384 and 500 it
 * passed the 5% goal from 10k to 200k tasks in some runs (docs/benchmarks.md, "tenth pass").
 */
export const MAX_PER_WORKER = 256;
/** At least the running task and the next one, so a worker never waits on the broker. */
export const MIN_PER_WORKER = 2;

/** The window for `workers` workers whose tasks take `averageMs` on average (undefined: none timed yet). */
export function autoPrefetch(workers: number, averageMs: number | undefined): number {
  if (averageMs === undefined) return defaultPrefetch(workers);
  const perWorker = Math.ceil(HOLD_MS / Math.max(averageMs, 0.001));
  const bounded = Math.min(MAX_PER_WORKER, Math.max(MIN_PER_WORKER, perWorker));
  return Math.min(MAX_PREFETCH, workers * bounded);
}

/**
 * The window the memory budget allows: as many deliveries as fit in `budgetBytes` at
 * `bytesEach` (the largest body accepted before any was seen, then the average), at least
 * one. The budget's pause (dispatch/held-bytes.ts) covers a body larger than the average.
 */
export function memoryBoundPrefetch(prefetch: number, budgetBytes: number, bytesEach: number): number {
  return Math.max(1, Math.min(prefetch, Math.floor(budgetBytes / Math.max(bytesEach, 1))));
}

/** Worth a basic.qos: a change of half or more either way (the average is noisy). */
export function worthRetuning(current: number, target: number): boolean {
  return target >= current * 1.5 || target * 1.5 <= current;
}

export interface AutoPrefetchOptions {
  logger: Logger;
  /** The pool: its size and its moving average of task durations. */
  pool: {
    readonly size: number;
    readonly averageTaskMs: number | undefined;
    giveBack(count: number): number;
  };
  consumer: { readonly prefetch: number; setPrefetch(count: number): Promise<void> };
  /** Deliveries received and not yet settled. */
  unsettled: () => number;
  /**
   * The memory budget for the bodies held in flight; the largest body accepted
   * (--max-message-bytes), which sizes the window until a body is seen; and the average
   * size so far.
   */
  memory?: {
    budgetBytes: number;
    largestBodyBytes: number;
    averageBodyBytes: () => number | undefined;
  };
}

/** How often to look at the average: cheap, and soon after start-up it matters. */
const RETUNE_EVERY_MS = 100;

export class AutoPrefetch {
  readonly #opts: AutoPrefetchOptions;
  readonly #log: Logger;
  #timer: NodeJS.Timeout | undefined;

  constructor(opts: AutoPrefetchOptions) {
    this.#opts = opts;
    this.#log = opts.logger.child({ component: 'prefetch' });
  }

  start(): void {
    this.#timer ??= setInterval(() => this.retune(), RETUNE_EVERY_MS);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** Sets the window the average asks for, and gives back what is held beyond a smaller one. */
  retune(): void {
    const { pool, consumer } = this.#opts;
    const current = consumer.prefetch;
    const memory = this.#opts.memory;
    const averageBodyBytes = memory?.averageBodyBytes();
    const byTime = autoPrefetch(pool.size, pool.averageTaskMs);
    // Before the first body, the largest one accepted: the window start-up chose
    // (config/options.ts), not the time's alone, which a first burst of large bodies would
    // overfill before the budget's pause could land.
    const target =
      memory === undefined
        ? byTime
        : memoryBoundPrefetch(byTime, memory.budgetBytes, averageBodyBytes ?? memory.largestBodyBytes);
    if (!worthRetuning(current, target)) return;
    void consumer.setPrefetch(target);
    const excess = this.#opts.unsettled() - target;
    const givenBack = excess > 0 ? pool.giveBack(excess) : 0;
    this.#log.info(
      { from: current, to: target, averageTaskMs: pool.averageTaskMs, averageBodyBytes, givenBack },
      'prefetch follows the task duration',
    );
  }
}
