// One timer per worker slot for the running task's time limit, not one per task: tiny
// tasks start and end tens of thousands of times a second, and a timer made and cleared
// for each was a per-task cost. The watch fires by the earliest time it was asked for;
// asked for a later one it keeps the earlier, and the task stop (task-stop.ts), when it
// fires, looks at the task running then and asks again for that task's deadline if it is
// not due.

export class LimitWatch {
  readonly #onFire: () => void;
  #timer: NodeJS.Timeout | undefined;
  /** When it fires (performance.now()), while it is set. */
  #at = 0;

  constructor(onFire: () => void) {
    this.#onFire = onFire;
  }

  /** Fires by `at` (performance.now()) at the latest: it is moved only when `at` is earlier. */
  watch(at: number, now: number): void {
    if (this.#timer !== undefined) {
      if (this.#at <= at) return;
      clearTimeout(this.#timer);
    }
    this.#at = at;
    this.#timer = setTimeout(
      () => {
        this.#timer = undefined;
        this.#onFire();
      },
      Math.max(0, at - now),
    );
  }

  stop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
