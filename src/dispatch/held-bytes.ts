// The bytes of message bodies the master holds in flight, and what follows from them: the
// budget (--max-held-bytes), which pauses consuming past it and resumes it under half
// (the gap keeps it from flapping); the average body, which the automatic prefetch fits
// its window to; and, a second after the master falls idle after a burst, one garbage
// collection (util/gc.ts), so the memory of the burst is returned then rather than at the
// next load.
import type { Logger } from 'pino';
import { collectGarbage } from '../util/gc.ts';

/** The body bytes after which an idle master asks for a garbage collection, and how often at most. */
const COLLECT_AFTER_BYTES = 32 * 1024 * 1024;
const COLLECT_EVERY_MS = 5_000;
/**
 * How long no body comes in and nothing is in flight before that collection: the fence
 * behind the last acks answers well within it.
 */
const COLLECT_AFTER_IDLE_MS = 1_000;

export interface HeldBytesOptions {
  /** The budget; undefined: no limit. */
  budget: number | undefined;
  /** Held bytes passed the budget (true), or came back under half of it (false). */
  onPressure?: (over: boolean) => void;
  logger: Logger;
  /** The full collection (util/gc.ts); a test's counter in unit tests. */
  collect?: () => void;
}

export class HeldBytes {
  readonly #opts: HeldBytesOptions;
  #held = 0;
  #average: number | undefined;
  #pressured = false;
  /** Body bytes taken since the last garbage collection asked for. */
  #sinceCollect = 0;
  #collectAt = 0;
  #collectTimer: NodeJS.Timeout | undefined;
  #closed = false;

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
    if (idle() && this.#sinceCollect >= COLLECT_AFTER_BYTES) this.#collectWhenIdle(idle);
    const budget = this.#opts.budget;
    if (budget === undefined || !this.#pressured || this.#held > budget / 2) return;
    this.#pressured = false;
    this.#opts.logger.info(
      { heldBytes: this.#held, budget },
      'the bytes held in flight are back under the budget: consuming resumes',
    );
    this.#opts.onPressure?.(false);
  }

  /** No collection after this: the service is draining (a stopped service collects nothing later). */
  close(): void {
    clearTimeout(this.#collectTimer);
    this.#collectTimer = undefined;
    this.#closed = true;
  }

  /**
   * One full collection once no body has come in and nothing has been in flight for
   * COLLECT_AFTER_IDLE_MS, at most one per COLLECT_EVERY_MS (a request inside that time
   * waits for its end, never dropped). Not at once: until the broker has answered the
   * fence behind the last acks, the consumer keeps what it needs of each acked delivery
   * (amqp/consumer.ts, `ackMemo`: the body itself for one without a message id), and a
   * collection then would leave the burst's last bodies in memory for as long as the
   * master stays idle.
   */
  #collectWhenIdle(idle: () => boolean): void {
    if (this.#collectTimer !== undefined || this.#closed) return;
    // The wall clock (performance.now() cannot be mocked in tests), bounded both ways: a
    // clock set back waits COLLECT_EVERY_MS at most.
    const wait = Math.min(COLLECT_EVERY_MS, Math.max(COLLECT_AFTER_IDLE_MS, this.#collectAt - Date.now()));
    this.#armCollection(idle, wait);
  }

  #armCollection(idle: () => boolean, wait: number): void {
    // take() adds to it: a body that came in meanwhile, even one settled since, shows here
    // without a cost per task.
    const taken = this.#sinceCollect;
    this.#collectTimer = setTimeout(() => {
      this.#collectTimer = undefined;
      // Busy, or busy meanwhile: a whole quiet while again from now.
      if (!idle() || this.#sinceCollect !== taken) {
        this.#armCollection(idle, COLLECT_AFTER_IDLE_MS);
        return;
      }
      this.#collectAt = Date.now() + COLLECT_EVERY_MS;
      this.#sinceCollect = 0;
      (this.#opts.collect ?? collectGarbage)();
    }, wait);
    this.#collectTimer.unref();
  }
}
