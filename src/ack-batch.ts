// Acks for one channel, coalesced: the acks made in one turn of the event loop go out as
// one `basic.ack multiple` up to the highest tag below every delivery still unsettled,
// plus single acks for the rest. Tasks finish out of order (several workers), so a
// multiple ack may only cover tags that are all finished: never one still running.

export interface AckFrames {
  /** Ack every delivery up to and including this tag (multiple = true), when defined. */
  upTo: number | undefined;
  /** Tags to ack one by one: finished, but above a delivery still running. */
  singles: number[];
}

export class AckBatch {
  /** Delivered and not yet settled, in delivery order (so ascending tags; a Set keeps insertion order). */
  readonly #unsettled = new Set<number>();
  #acked: number[] = [];

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

  /** The frames that send every ack made so far. */
  take(): AckFrames {
    const acked = this.#acked;
    this.#acked = [];
    if (acked.length === 0) return { upTo: undefined, singles: [] };
    const lowestUnsettled: number | undefined = this.#unsettled.values().next().value;
    let upTo: number | undefined;
    const singles: number[] = [];
    for (const tag of acked) {
      if (lowestUnsettled === undefined || tag < lowestUnsettled)
        upTo = upTo === undefined ? tag : Math.max(upTo, tag);
      else singles.push(tag);
    }
    return { upTo, singles };
  }
}
