// The per-function limits of this service (README "Per-task options"): at most
// `concurrency` runs of a function at once, and at most `rate.count` starts of it in any
// window of `rate.perMs`. The scheduler asks before it hands a task over; a task whose
// function is at its limit stays in the master's queue and holds no worker, and the tasks
// of other functions pass it.
//
// The rate is a sliding window, not a token bucket: "5/s" never means 10 starts within
// one second (a bucket refilled at the end of a full burst allows that), which is what a
// limit set for a downstream API must mean. It keeps the last `count` start times.
import type { RateLimit, TaskLimits } from '../ipc/task-options.ts';

export type LimitKind = 'concurrency' | 'rate';

class FuncState {
  /** Runs handed to a worker and not ended. */
  running = 0;
  concurrency: number | undefined;
  rate: RateLimit | undefined;
  /** The last `rate.count` start times, a ring; `next` is the oldest once full. */
  #starts: Float64Array | undefined;
  #next = 0;
  #filled = 0;

  configure(limits: TaskLimits | undefined): void {
    this.concurrency = limits?.concurrency;
    const rate = limits?.rate;
    if (rate?.count !== this.rate?.count || rate?.perMs !== this.rate?.perMs) {
      this.rate = rate;
      this.#starts = undefined;
      this.#next = 0;
      this.#filled = 0;
    }
  }

  /** How long until the rate allows another start (0: now). */
  rateWaitMs(now: number): number {
    const rate = this.rate;
    if (rate === undefined || this.#starts === undefined || this.#filled < rate.count) return 0;
    const oldest = this.#starts[this.#next] as number;
    return Math.max(0, oldest + rate.perMs - now);
  }

  started(now: number): void {
    this.running++;
    const rate = this.rate;
    if (rate === undefined) return;
    this.#starts ??= new Float64Array(rate.count);
    this.#starts[this.#next] = now;
    this.#next = (this.#next + 1) % rate.count;
    if (this.#filled < rate.count) this.#filled++;
  }
}

export class FuncLimits {
  readonly #states = new Map<string, FuncState>();
  /** Whether any function has a limit: the scheduler asks nothing per task otherwise. */
  active = false;

  /** The limits the newest task code declares (a reload applies them to runs that start from now on). */
  configure(limits: Readonly<Record<string, TaskLimits>>): void {
    this.active = false;
    for (const [func, state] of this.#states) {
      state.configure(limits[func]);
      if (state.running === 0 && state.concurrency === undefined && state.rate === undefined)
        this.#states.delete(func);
    }
    for (const func of Object.keys(limits)) {
      const own = limits[func] as TaskLimits;
      if (own.concurrency === undefined && own.rate === undefined) continue;
      let state = this.#states.get(func);
      if (state === undefined) {
        state = new FuncState();
        state.configure(own);
        this.#states.set(func, state);
      }
    }
    for (const state of this.#states.values())
      if (state.concurrency !== undefined || state.rate !== undefined) this.active = true;
  }

  /** Whether `func` has a limit of its own (its tasks go only to a worker that holds nothing). */
  has(func: string): boolean {
    return this.#states.has(func);
  }

  /** Why a task of `func` may not start now, or undefined when it may. */
  blocked(func: string, now: number): LimitKind | undefined {
    const state = this.#states.get(func);
    if (state === undefined) return undefined;
    if (state.concurrency !== undefined && state.running >= state.concurrency) return 'concurrency';
    if (state.rateWaitMs(now) > 0) return 'rate';
    return undefined;
  }

  /** How long until `func`'s rate allows a start (0 when it has none or allows one now). */
  rateWaitMs(func: string, now: number): number {
    return this.#states.get(func)?.rateWaitMs(now) ?? 0;
  }

  /**
   * A task of `func` is handed over: it counts as a start and holds a place until its
   * `release` (its job ends, or it comes back unstarted).
   */
  take(func: string, now: number): { release(): void } | undefined {
    const state = this.#states.get(func);
    if (state === undefined) return undefined;
    state.started(now);
    let held = true;
    return {
      release: () => {
        if (!held) return;
        held = false;
        state.running--;
      },
    };
  }

  /** Runs of `func` holding a place now (for /status). */
  running(func: string): number {
    return this.#states.get(func)?.running ?? 0;
  }
}
