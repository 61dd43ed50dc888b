// The acks of one channel, and when they go out. AckBatch (ack-batch.ts) decides which
// frames cover the acks made; this decides when to send them: at the end of the turn once
// enough wait (a quarter of the prefetch window, see prefetch.ts), else within
// ACK_DELAY_MS. Each ack frame is a write and a wake-up of the broker; an ack that waits
// a moment costs only window, which the threshold bounds. A flusher belongs to one
// session: once stopped (its channel gone), it sends nothing more, and what it held is
// the broker's to redeliver.
//
// Fences. An ack written to the socket is not an ack the broker has: a link that went
// silent swallows it, and the message comes back after the reconnect although it ran. So
// after acks go out the flusher makes a cheap synchronous round trip on the same channel
// (the fence: basic.qos with the prefetch in force). The broker handles a channel's frames
// in order, so the answer proves that every ack written before it arrived: those are
// confirmed. Acks not yet covered by an answered fence are uncertain, and when the
// session ends the consumer reports them (their redeliveries are then acked unrun). A
// fence not answered within its deadline means the link is dead, in either direction:
// the session is ended at once instead of after two missed heartbeats. So that a silence
// is noticed just as soon when no ack happens to be going out (a lull between bursts),
// a fence is also sent when none has been for FENCE_PROBE_MS.
import type { Channel, ConsumeMessage } from 'amqplib';
import { AckBatch } from './ack-batch.ts';
import { isRefusedAsClosing } from './connection.ts';
import { writeTogetherThisTurn } from './turn-writes.ts';

/** How long an ack may wait to go out with others. */
const ACK_DELAY_MS = 1;
/**
 * How long an ack may wait instead, while the tasks waiting in the master only for a free
 * worker hold enough work to keep every worker busy through the wait and the broker's
 * refill after it (the owner's `mayWait`, asked for twice this): its place in the window
 * then feeds no one. With long tasks each ack went out alone, and each frame cost a
 * write, a wake-up of the broker, a delivery back and a wake-up of the master: the
 * broker's CPU and the master's for a 10 ms task, taken from the workers. Tiny tasks
 * drain such a backlog in less than the wait, and a pipeline of them needs the window
 * refilled all the time: their acks go within ACK_DELAY_MS (docs/benchmarks.md,
 * "fifteenth pass"). Acks that waited go out together, with their fence in the same write.
 */
const ACK_WAIT_MS = 20;
/** How long a delivery may hold back the acks above it before they go out alone (see #flushTimed). */
const ACK_HOLD_MS = 5;
/**
 * How long acks wait for a fence once FENCE_BATCH of them wait, and the least time between
 * one fence's answer and the next fence: fences are one at a time and batch what came
 * meanwhile. Short under load, because what the session keeps of an acked delivery lives
 * until a fence answers: at 25 ms it outlived two scavenges at tiny-task rates and was
 * promoted, a task after a task, and the old generation and RSS grew with the task count
 * (docs/benchmarks.md). A fence is one small round trip: fewer than 200 a second.
 */
const FENCE_EVERY_MS = 5;
/** Acks that make a fence due FENCE_EVERY_MS after the first of them; fewer wait up to FENCE_WITHIN_MS. */
const FENCE_BATCH = 32;
/**
 * How long fewer than FENCE_BATCH acks wait for their fence, at most. With long tasks each
 * ack frame carries one or two acks: a fence 5 ms after each was a timer, a write, the
 * broker's answer and two wake-ups of the master per frame, about a quarter of the
 * master's JavaScript time for a 10 ms task. What waits longer is at most 31 small memos
 * (up to some 1,300 acks a second); at tiny-task rates the batch fills within a
 * millisecond and the 5 ms rule applies.
 */
const FENCE_WITHIN_MS = 25;
/** A fence at least this often while the session lives, acks or not: a silent link is noticed in a lull too. */
const FENCE_PROBE_MS = 2_000;

export interface Fence {
  /** The round trip (a synchronous method on the channel whose answer follows the acks). */
  run: () => Promise<unknown>;
  /** These tags' acks are proven to have reached the broker. */
  onConfirmed: (tags: number[]) => void;
  /** A fence went unanswered past its deadline: the link is dead. */
  onUnanswered: (waitedMs: number) => void;
}

/** The deadline of a fence: 20 round trips, from 3 s to 8 s (noticed within 10 s under load). */
export function fenceDeadlineMs(roundTripMs: number | undefined): number {
  return Math.min(8_000, Math.max(3_000, 20 * (roundTripMs ?? 0)));
}

export class AckFlusher {
  readonly #channel: Channel;
  readonly #batch = new AckBatch();
  /** Acks waiting that make a flush worth it at once. */
  #flushAt: number;
  #soon: NodeJS.Immediate | undefined;
  #later: NodeJS.Timeout | undefined;
  /** When #later fires. */
  #laterAt = 0;
  /** #later is an ACK_WAIT_MS wait: its acks take their fence along. */
  #laterWaits = false;
  /** Whether acks may wait ACK_WAIT_MS now (tasks wait in the master only for a free worker). */
  readonly #mayWait: ((workMs: number) => boolean) | undefined;
  /** The lowest unsettled delivery at the last timed flush, and since when it has been. */
  #lowest: { tag: number | undefined; since: number } = { tag: undefined, since: 0 };
  #stopped = false;
  readonly #fence: Fence | undefined;
  /** Tags written since the last fence was sent: the next fence covers them. */
  #unfenced: number[] = [];
  /** When the first of #unfenced was written. */
  #unfencedSince = 0;
  #fenceTimer: NodeJS.Timeout | undefined;
  /** When #fenceTimer fires. */
  #fenceAt = 0;
  #fenceDeadline: NodeJS.Timeout | undefined;
  #fenceInFlight = false;
  /** A moving average of fence round trips. */
  #roundTripMs: number | undefined;
  #probe: NodeJS.Timeout | undefined;
  #lastFenceAt = performance.now();
  /** When the last fence was answered: the next one goes FENCE_EVERY_MS after it at the soonest. */
  #lastAnswerAt = Number.NEGATIVE_INFINITY;

  constructor(channel: Channel, flushAt: number, fence?: Fence, mayWait?: (workMs: number) => boolean) {
    this.#channel = channel;
    this.#flushAt = flushAt;
    this.#fence = fence;
    this.#mayWait = mayWait;
    if (fence !== undefined) {
      this.#probe = setInterval(() => {
        if (!this.#fenceInFlight && performance.now() - this.#lastFenceAt >= FENCE_PROBE_MS)
          this.#sendFence(true);
      }, FENCE_PROBE_MS / 2);
      this.#probe.unref();
    }
  }

  /** The measured fence round trip, once one was answered. */
  get roundTripMs(): number | undefined {
    return this.#roundTripMs;
  }

  set flushAt(count: number) {
    this.#flushAt = count;
  }

  /** Acks made and not yet written to the socket (they go out within a few ms). */
  get pending(): number {
    return this.#batch.pending;
  }

  delivered(tag: number): void {
    this.#batch.delivered(tag);
  }

  ack(tag: number): void {
    if (this.#stopped) return;
    this.#batch.ack(tag);
    if (this.#batch.pending >= this.#flushAt) this.#soon ??= setImmediate(() => this.flush(true));
    else if (this.#mayWait?.(2 * ACK_WAIT_MS) === true) this.#flushWithin(ACK_WAIT_MS, true);
    else this.#flushWithin(ACK_DELAY_MS);
  }

  /** A tag settled otherwise, at once (nack, reject): it no longer holds back a multiple ack. */
  settled(tag: number): void {
    this.#batch.settled(tag);
    // The acks it held back may go now.
    if (this.#batch.pending > 0 && !this.#stopped) this.#flushWithin(ACK_DELAY_MS);
  }

  /**
   * A timed flush within `ms`, unless one is due sooner. One timer, moved earlier when an
   * ack or a settle may free what is held: every timer that fires wakes the master, and
   * while a worker runs a 10 ms task the master has nothing else to wake for.
   */
  #flushWithin(ms: number, waits = false): void {
    const at = performance.now() + ms;
    if (this.#later !== undefined) {
      if (this.#laterAt <= at) return;
      clearTimeout(this.#later);
    }
    this.#laterAt = at;
    this.#laterWaits = waits;
    this.#later = setTimeout(() => this.#flushTimed(), ms);
  }

  /**
   * The timed flush: a multiple ack for what it can cover, and the acks held above a
   * delivery still running go out alone only once that delivery has been the lowest
   * unsettled for ACK_HOLD_MS: a task that long is not about to finish, and must not hold
   * the window shut. Tasks queued behind a short one finish first and are covered.
   */
  #flushTimed(): void {
    this.#later = undefined;
    const lowest = this.#batch.lowestUnsettled;
    const now = performance.now();
    if (lowest !== this.#lowest.tag) this.#lowest = { tag: lowest, since: now };
    // Acks that waited ACK_WAIT_MS are not held back further: another wake-up to send
    // them would cost more than the frame they might save.
    const waited = this.#laterWaits;
    this.flush(!waited && now - this.#lowest.since < ACK_HOLD_MS, waited);
  }

  /**
   * Sends the acks made so far; `holdBack` keeps those above a delivery still running;
   * `fenceNow`: they waited ACK_WAIT_MS, and their fence goes in the same write.
   */
  flush(holdBack = false, fenceNow = false): void {
    clearImmediate(this.#soon);
    this.#soon = undefined;
    if (!holdBack) {
      clearTimeout(this.#later);
      this.#later = undefined;
    }
    if (this.#stopped) return;
    const { upTo, singles, sent } = this.#batch.take({ holdBack });
    // What is left is held above a delivery still running: look again when its hold ends
    // (an ack or a settle before that brings the look forward), not every ACK_DELAY_MS.
    // Polling each millisecond woke the master about five times for each 10 ms task.
    if (this.#batch.pending > 0) {
      const held = this.#batch.lowestUnsettled === this.#lowest.tag;
      const holdEndsIn = held ? this.#lowest.since + ACK_HOLD_MS - performance.now() : 0;
      this.#flushWithin(Math.max(ACK_DELAY_MS, Math.ceil(holdEndsIn)));
    }
    try {
      // amqplib reads only the delivery tag of the message it is given.
      if (upTo !== undefined) this.#channel.ack({ fields: { deliveryTag: upTo } } as ConsumeMessage, true);
      for (const tag of singles) this.#channel.ack({ fields: { deliveryTag: tag } } as ConsumeMessage, false);
      // Several frames (a multiple ack and the singles above it, or acks and their fence):
      // one write, not one each.
      if (singles.length + (upTo === undefined ? 0 : 1) > (fenceNow ? 0 : 1))
        writeTogetherThisTurn(this.#channel);
    } catch (err) {
      // amqplib refuses a write at once, by a throw, once the channel or its connection has
      // begun to close: the session is ending, and a throw from this timer would end the
      // process. What was not written is the broker's to redeliver (and the session reports
      // it as uncertain): like a flusher stopped a moment later. Anything else is a defect
      // and is not hidden.
      if (!isRefusedAsClosing(err)) throw err;
      this.stop();
      return;
    }
    if (sent.length > 0 && this.#fence !== undefined) {
      if (this.#unfenced.length === 0) this.#unfencedSince = performance.now();
      for (const tag of sent) this.#unfenced.push(tag);
      this.#fenceSoon(fenceNow);
    }
  }

  /**
   * A fence when it is due (FENCE_EVERY_MS after the first unfenced ack once FENCE_BATCH
   * wait, else FENCE_WITHIN_MS), unless one is on its way: its answer sends the next one
   * for what came meanwhile. One timer, moved earlier when the batch fills.
   */
  #fenceSoon(now = false): void {
    if (this.#fenceInFlight || this.#stopped) return;
    const wait = now ? 0 : this.#unfenced.length >= FENCE_BATCH ? FENCE_EVERY_MS : FENCE_WITHIN_MS;
    // And never sooner than FENCE_EVERY_MS after the last answer: under load, a fence's
    // round trip plus 5 ms apart, as they always were.
    const at = Math.max(this.#unfencedSince + wait, this.#lastAnswerAt + FENCE_EVERY_MS);
    // Acks that waited ACK_WAIT_MS: their fence follows them in the same turn (one write).
    if (now && at <= performance.now()) {
      this.#sendFence();
      return;
    }
    if (this.#fenceTimer !== undefined) {
      if (this.#fenceAt <= at) return;
      clearTimeout(this.#fenceTimer);
    }
    this.#fenceAt = at;
    this.#fenceTimer = setTimeout(() => this.#sendFence(), Math.max(0, at - performance.now()));
  }

  #sendFence(probe = false): void {
    // A probe may come while a timed fence is armed: this one covers what that one would.
    clearTimeout(this.#fenceTimer);
    this.#fenceTimer = undefined;
    const fence = this.#fence;
    if (fence === undefined || this.#stopped || (this.#unfenced.length === 0 && !probe)) return;
    this.#lastFenceAt = performance.now();
    const covered = this.#unfenced;
    this.#unfenced = [];
    this.#fenceInFlight = true;
    const sentAt = performance.now();
    const deadlineMs = fenceDeadlineMs(this.#roundTripMs);
    this.#fenceDeadline = setTimeout(() => {
      if (!this.#stopped) fence.onUnanswered(performance.now() - sentAt);
    }, deadlineMs);
    fence.run().then(
      () => {
        clearTimeout(this.#fenceDeadline);
        this.#fenceInFlight = false;
        if (this.#stopped) return;
        this.#lastAnswerAt = performance.now();
        const ms = this.#lastAnswerAt - sentAt;
        this.#roundTripMs = this.#roundTripMs === undefined ? ms : this.#roundTripMs * 0.8 + ms * 0.2;
        if (covered.length > 0) fence.onConfirmed(covered);
        if (this.#unfenced.length > 0) this.#fenceSoon();
      },
      () => {
        // The channel is closing: the session's end reports what was not confirmed.
        clearTimeout(this.#fenceDeadline);
        this.#fenceInFlight = false;
      },
    );
  }

  /** The channel has gone: nothing more is sent, and no timer is left behind. */
  stop(): void {
    this.#stopped = true;
    clearImmediate(this.#soon);
    clearTimeout(this.#later);
    clearTimeout(this.#fenceTimer);
    clearTimeout(this.#fenceDeadline);
    clearInterval(this.#probe);
    this.#soon = undefined;
    this.#later = undefined;
  }
}
