// What follows a delivery whose settling failed (a bug of ours, or a broker that refuses
// something of it): it is requeued, since a delivery must end. The same
// message failing to settle again and again in this process must not become a hot loop of
// redeliveries, so from its third failure on it is held for a growing while (the delivery
// stays unacked) before it is requeued. The drain requeues everything held at once. Kept
// apart from the settlement (settlement.ts), which says how it is requeued; this module
// says when.
import type { Logger } from 'pino';
import { crashKey } from './crash-journal.ts';
import { logFields, type Work } from './work.ts';

/** How many messages' failure counts are remembered; the oldest is forgotten first. */
const REMEMBERED = 10_000;
/** The failures given back at once; from the next one on, each is held. */
const AT_ONCE = 2;
const FIRST_HOLD_MS = 1_000;
const LONGEST_HOLD_MS = 30_000;

export class SettleFailures {
  readonly #log: Logger;
  /** How often each message (by digest) failed to settle in this process; bounded. */
  readonly #counts = new Map<string, number>();
  /** Messages held back: each is requeued when its release is called. */
  readonly #held = new Set<() => void>();

  constructor(log: Logger) {
    this.#log = log;
  }

  /**
   * Counts one more failure of this work's message and calls `requeue` once: now, or
   * after a hold that doubles from 1 s up to 30 s from its third failure on (never held
   * while `draining`).
   */
  failed(work: Work, draining: boolean, requeue: () => void): void {
    const key = crashKey(work.messageId, work.delivery.message.content);
    const failures = (this.#counts.get(key) ?? 0) + 1;
    // Delete and set: the map's order is the order of last failure, the oldest first.
    this.#counts.delete(key);
    this.#counts.set(key, failures);
    if (this.#counts.size > REMEMBERED) this.#counts.delete(this.#counts.keys().next().value as string);
    if (failures <= AT_ONCE || draining) {
      requeue();
      return;
    }
    const delayMs = Math.min(LONGEST_HOLD_MS, FIRST_HOLD_MS * 2 ** (failures - AT_ONCE - 1));
    this.#log.warn(
      { ...logFields(work), failures, delayMs },
      'this message keeps failing to settle: holding it before it goes back',
    );
    const release = () => {
      this.#held.delete(release);
      clearTimeout(timer);
      requeue();
    };
    const timer = setTimeout(release, delayMs);
    this.#held.add(release);
  }

  /** The drain: everything held is requeued now. */
  releaseAll(): void {
    for (const release of [...this.#held]) release();
  }
}
