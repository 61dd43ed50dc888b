// A bounded memory of keys that expires: enough to recognise a message that comes back
// after a reconnect, without growing with the traffic, and without recognising, much
// later, a different message that happens to share the key (an operator's replay, or a
// message another replica ran meanwhile).

export class RecentIds {
  readonly #capacity: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  /** Key → when it was added; a Map keeps insertion order, so the oldest is first. */
  readonly #added = new Map<string, number>();

  constructor(
    capacity: number,
    ttlMs = Number.POSITIVE_INFINITY,
    now: () => number = performance.now.bind(performance),
  ) {
    this.#capacity = capacity;
    this.#ttlMs = ttlMs;
    this.#now = now;
  }

  get size(): number {
    this.#expire();
    return this.#added.size;
  }

  has(id: string): boolean {
    this.#expire();
    return this.#added.has(id);
  }

  add(id: string): void {
    this.#added.delete(id); // re-adding makes it the newest
    this.#added.set(id, this.#now());
    if (this.#added.size > this.#capacity) {
      const oldest = this.#added.keys().next().value as string;
      this.#added.delete(oldest);
    }
  }

  delete(id: string): void {
    this.#added.delete(id);
  }

  #expire(): void {
    const cutoff = this.#now() - this.#ttlMs;
    for (const [id, at] of this.#added) {
      if (at > cutoff) return;
      this.#added.delete(id);
    }
  }
}
