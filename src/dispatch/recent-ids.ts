// A bounded memory of keys that expires: enough to recognise a message that comes back
// after a reconnect, without growing with the traffic, and without recognising, much
// later, a different message that happens to share the key (an operator's replay, or a
// message another replica ran meanwhile). A key added twice is held twice (a multiset):
// two messages with the same body are two messages, and each comeback takes one.

export class RecentIds {
  readonly #capacity: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  /** Key → when it was last added and how many times it is held; the oldest first. */
  readonly #added = new Map<string, { at: number; count: number }>();

  constructor(
    capacity: number,
    ttlMs = Number.POSITIVE_INFINITY,
    now: () => number = performance.now.bind(performance),
  ) {
    this.#capacity = capacity;
    this.#ttlMs = ttlMs;
    this.#now = now;
  }

  /** How many keys are held (a key held twice counts once). */
  get size(): number {
    this.#expire();
    return this.#added.size;
  }

  has(id: string): boolean {
    this.#expire();
    return this.#added.has(id);
  }

  add(id: string): void {
    const held = this.#added.get(id);
    this.#added.delete(id); // re-adding makes it the newest
    this.#added.set(id, { at: this.#now(), count: (held?.count ?? 0) + 1 });
    if (this.#added.size > this.#capacity) {
      const oldest = this.#added.keys().next().value as string;
      this.#added.delete(oldest);
    }
  }

  /** Takes one of `id`: true when it was held. */
  take(id: string): boolean {
    this.#expire();
    const held = this.#added.get(id);
    if (held === undefined) return false;
    if (held.count > 1) held.count--;
    else this.#added.delete(id);
    return true;
  }

  delete(id: string): void {
    this.#added.delete(id);
  }

  #expire(): void {
    const cutoff = this.#now() - this.#ttlMs;
    for (const [id, { at }] of this.#added) {
      if (at > cutoff) return;
      this.#added.delete(id);
    }
  }
}
