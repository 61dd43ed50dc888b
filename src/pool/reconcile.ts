// The pool's convergence rule, as a pure function: from a snapshot of the slots and what
// is wanted, which slots leave and how many to spawn. The Supervisor (supervisor.ts) calls
// it after every change and carries the plan out; test/unit/pool/reconcile.test.ts checks
// its properties over arbitrary pools. Whatever interleaving of resizes, reloads,
// recycles, timeouts and crashes led here, a plan is one safe step towards "`desired`
// live workers, all of the newest code", and never takes away workers that serve while
// fewer would be left than asked for.
import type { SlotState } from './slot.ts';

/** What reconcile needs to know of one slot. */
export interface SlotView {
  id: number;
  /** Which reload of the task code it runs. */
  generation: number;
  state: SlotState;
  /** Counted towards the pool's size: not stopping, and not on its way out. */
  live: boolean;
  /** It has said ready and is not stopping. */
  up: boolean;
}

export interface PoolTarget {
  desired: number;
  /** The code generation workers should run. */
  generation: number;
  /** A generation whose workers failed to boot during a roll: its older workers stay. */
  failedGeneration: number;
  /** Spawning waits (workers are failing to boot): leaves only. */
  backingOff: boolean;
  /**
   * The most slots starting at once: a large resize forks in steps, each step once the
   * previous ones are up, so a thousand forks never land on the machine in one go.
   */
  maxStarting: number;
}

export type LeaveWhy = 'reload' | 'scale';

export interface ReconcilePlan {
  /** Slots sent away, in order: each stops counting as live at once. */
  leave: { id: number; why: LeaveWhy }[];
  spawn: number;
  /** No live worker runs older code: a roll in progress is over. */
  rollDone: boolean;
}

/** Whether a slot of `generation` runs code older than the target's (and a roll is on). */
export function isStale(generation: number, target: PoolTarget): boolean {
  return generation < target.generation && target.failedGeneration < target.generation;
}

/** Which stale slot leaves first in a roll: the oldest code, idle before busy. */
const ROLL_ORDER: Record<SlotState, number> = { idle: 0, busy: 1, starting: 2, stopping: 3 };
/** Which surplus slot leaves first: those that serve nothing yet, then idle, then busy. */
const SURPLUS_ORDER: Record<SlotState, number> = { starting: 0, idle: 1, busy: 2, stopping: 3 };

export function reconcile(slots: readonly SlotView[], target: PoolTarget): ReconcilePlan {
  const leave: ReconcilePlan['leave'] = [];
  const stale = (s: SlotView) => isStale(s.generation, target);
  const send = (victim: SlotView, why: LeaveWhy) => {
    leave.push({ id: victim.id, why });
    live = live.filter((s) => s !== victim);
  };
  let live = slots.filter((s) => s.live);
  // 1. A slot of old code that is still starting serves nothing: it goes at once.
  for (const s of live.filter((s) => stale(s) && s.state === 'starting')) send(s, 'reload');
  // 2. Too many. In a roll, an old worker that serves leaves only while more than the
  //    size asked for serve, so capacity never drops below it; a roll may run one over
  //    while its new worker starts. Beyond that, the surplus, starting ones first.
  while (live.length > target.desired) {
    const serving = live.filter((s) => s.up).length;
    const oldest = live
      .filter((s) => stale(s) && s.up)
      .sort((a, b) => a.generation - b.generation || ROLL_ORDER[a.state] - ROLL_ORDER[b.state])[0];
    if (oldest !== undefined && serving > target.desired) {
      send(oldest, 'reload');
      continue;
    }
    const surging = live.some((s) => !stale(s) && s.state === 'starting') && live.some(stale);
    if (surging && live.length <= target.desired + 1) break;
    const victim = [...live].sort(
      (a, b) => SURPLUS_ORDER[a.state] - SURPLUS_ORDER[b.state] || Number(stale(b)) - Number(stale(a)),
    )[0] as SlotView;
    send(victim, stale(victim) ? 'reload' : 'scale');
  }
  // 3. Too few, or a roll to carry on: spawn (not while backing off).
  const staleLeft = live.filter(stale).length;
  const rollDone = staleLeft === 0;
  if (target.backingOff) return { leave, spawn: 0, rollDone };
  let spawn = Math.max(0, target.desired - live.length);
  const surging = live.some((s) => !stale(s) && s.state === 'starting');
  // A roll replaces one worker at a time: a new one starts before an old one leaves.
  if (spawn === 0 && staleLeft > 0 && !surging) spawn = 1;
  const starting = live.filter((s) => s.state === 'starting').length;
  spawn = Math.min(spawn, Math.max(0, target.maxStarting - starting));
  return { leave, spawn, rollDone };
}
