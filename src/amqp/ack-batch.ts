// Acks for one channel, coalesced: the acks made in one turn of the event loop go out as
// one `basic.ack multiple` up to the highest tag below every delivery still unsettled.
// Tasks finish out of order (several workers), so a multiple ack may only cover tags
// that are all finished: never one still running. An ack above a delivery still running
// may wait (holdBack) for a later multiple ack to cover it, which it usually does a
// moment later: each frame is a write on the socket, and with several workers nearly
// every turn has such acks. It must not wait long, or a long task below it would hold
// the prefetch window shut; the caller sends it alone after a short while.

export interface AckFrames {
  /** Ack every delivery up to and including this tag (multiple = true), when defined. */
  upTo: number | undefined;
  /** Tags to ack one by one: finished, but above a delivery still running. */
  singles: number[];
  /** Every tag these frames ack. */
  sent: number[];
}

export interface TakeOptions {
  /** Keep the acks above a delivery still running for a later take, instead of as singles. */
  holdBack?: boolean;
}

export class AckBatch {
  /** Delivered and not yet settled, in delivery order (so ascending tags; a Set keeps insertion order). */
  readonly #unsettled = new Set<number>();
  #acked: number[] = [];

  /** The oldest delivery not settled yet: it holds back the acks above it. */
  get lowestUnsettled(): number | undefined {
    return this.#unsettled.values().next().value;
  }

  /** Acks made and not sent yet (held back ones included). */
  get pending(): number {
    return this.#acked.length;
  }

  delivered(tag: number): void {
    this.#unsettled.add(tag);
  }

  /** Marks a tag acked; it goes out with the next take(). */
  ack(tag: number): void {
    if (this.#unsettled.delete(tag)) this.#acked.push(tag);
  }

  /** A tag settled otherwise, at once (nack, reject): it no longer holds back a multiple ack. */
  settled(tag: number): void {
    this.#unsettled.delete(tag);
  }

  /** The frames that send every ack made so far (but those held back, if asked). */
  take({ holdBack = false }: TakeOptions = {}): AckFrames {
    const acked = this.#acked;
    this.#acked = [];
    if (acked.length === 0) return { upTo: undefined, singles: [], sent: [] };
    const lowestUnsettled = this.lowestUnsettled;
    let upTo: number | undefined;
    const above: number[] = [];
    for (const tag of acked) {
      if (lowestUnsettled === undefined || tag < lowestUnsettled)
        upTo = upTo === undefined ? tag : Math.max(upTo, tag);
      else above.push(tag);
    }
    if (holdBack) {
      this.#acked = above;
      if (above.length === 0) return { upTo, singles: [], sent: acked };
      const held = new Set(above);
      return { upTo, singles: [], sent: acked.filter((t) => !held.has(t)) };
    }
    return { upTo, singles: above, sent: acked };
  }
}
