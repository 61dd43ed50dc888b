// The prefetch when none is given (SPEC: "chosen by measurement; never unbounded"): sized
// by the measured task duration so that an instance holds about HOLD_MS of work per
// worker. Tiny tasks need a deep window (a few hundred deliveries) to keep the master,
// the children and the broker all busy; long tasks need a shallow one, or one instance
// sits on messages another could run. One fixed number cannot be both.
//
// It starts at the safe default (defaultPrefetch) until tasks have been timed, then
// follows the pool's moving average. When it shrinks, the deliveries received beyond
// the new window that have not been handed to a worker go back to the queue: basic.qos
// never takes back what was delivered, and a burst of long tasks after tiny ones would
// otherwise keep hundreds of messages waiting here, past RabbitMQ's consumer_timeout.
import type { Logger } from 'pino';
import { defaultPrefetch, MAX_PREFETCH } from './config.ts';

/** The work, in milliseconds at the average duration, one worker may have waiting here. */
export const HOLD_MS = 1_000;
/** The most one worker's share may be (MAX_PREFETCH bounds them all). */
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
    const target = autoPrefetch(pool.size, pool.averageTaskMs);
    if (!worthRetuning(current, target)) return;
    void consumer.setPrefetch(target);
    const excess = this.#opts.unsettled() - target;
    const givenBack = excess > 0 ? pool.giveBack(excess) : 0;
    this.#log.info(
      { from: current, to: target, averageTaskMs: pool.averageTaskMs, givenBack },
      'prefetch follows the task duration',
    );
  }
}
