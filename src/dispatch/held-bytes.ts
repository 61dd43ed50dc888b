// The bytes of message bodies the master holds in flight, and what follows from them: the
// budget (--max-held-bytes), which pauses consuming past it and resumes it under half
// (the gap keeps it from flapping); the average body, which the automatic prefetch fits
// its window to; and, once idle after a burst, one garbage collection (util/gc.ts), so
// the memory of the burst is returned now rather than at the next load.
import type { Logger } from 'pino';
import { collectGarbage } from '../util/gc.ts';

/** The body bytes after which an idle master asks for a garbage collection, and how often at most. */
const COLLECT_AFTER_BYTES = 32 * 1024 * 1024;
const COLLECT_EVERY_MS = 5_000;

export interface HeldBytesOptions {
  /** The budget; undefined: no limit. */
  budget: number | undefined;
  /** Held bytes passed the budget (true), or came back under half of it (false). */
  onPressure?: (over: boolean) => void;
  logger: Logger;
}

export class HeldBytes {
  readonly #opts: HeldBytesOptions;
  #held = 0;
  #average: number | undefined;
  #pressured = false;
  /** Body bytes taken since the last garbage collection asked for. */
  #sinceCollect = 0;
  #collectAt = 0;

  constructor(opts: HeldBytesOptions) {
    this.#opts = opts;
  }

  /** The bytes of the bodies held now. */
  get held(): number {
    return this.#held;
  }

  /** A moving average of body sizes (undefined before the first). */
  get averageBody(): number | undefined {
    return this.#average;
  }

  /** A body came in. */
  take(bytes: number): void {
    this.#held += bytes;
    this.#sinceCollect += bytes;
    this.#average = this.#average === undefined ? bytes : this.#average * 0.9 + bytes * 0.1;
    const budget = this.#opts.budget;
    if (budget === undefined || this.#pressured || this.#held <= budget) return;
    this.#pressured = true;
    this.#opts.logger.warn(
      { heldBytes: this.#held, budget },
      'the bytes held in flight passed the budget: consuming pauses',
    );
    this.#opts.onPressure?.(true);
  }

  /** A body was settled; `idle`: nothing is in flight any more. */
  release(bytes: number, idle: () => boolean): void {
    this.#held -= bytes;
    if (idle() && this.#sinceCollect >= COLLECT_AFTER_BYTES) this.#collectSoon(idle);
    const budget = this.#opts.budget;
    if (budget === undefined || !this.#pressured || this.#held > budget / 2) return;
    this.#pressured = false;
    this.#opts.logger.info(
      { heldBytes: this.#held, budget },
      'the bytes held in flight are back under the budget: consuming resumes',
    );
    this.#opts.onPressure?.(false);
  }

  /** One full collection after this turn, if still idle; at most one per COLLECT_EVERY_MS. */
  #collectSoon(idle: () => boolean): void {
    const now = performance.now();
    if (now < this.#collectAt) return;
    this.#collectAt = now + COLLECT_EVERY_MS;
    this.#sinceCollect = 0;
    setImmediate(() => {
      if (idle()) collectGarbage();
    });
  }
}
