// The pool's convergence rule over arbitrary pools: whatever mix of starting, idle, busy,
// leaving and stopping slots of whatever code generations, a plan is one safe step.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { isStale, type PoolTarget, reconcile, type SlotView } from '../../../src/pool/reconcile.ts';
import type { SlotState } from '../../../src/pool/slot.ts';

fc.configureGlobal({ numRuns: 2000 });

const slotArb = fc.record({
  generation: fc.integer({ min: 0, max: 3 }),
  state: fc.constantFrom<SlotState>('starting', 'idle', 'busy', 'stopping'),
  leaving: fc.boolean(),
});

const poolArb = fc
  .record({
    slots: fc.array(slotArb, { maxLength: 12 }),
    desired: fc.integer({ min: 1, max: 8 }),
    generation: fc.integer({ min: 0, max: 3 }),
    failedGeneration: fc.integer({ min: -1, max: 3 }),
    backingOff: fc.boolean(),
    maxStarting: fc.integer({ min: 1, max: 6 }),
  })
  .map(({ slots, ...target }) => {
    const views: SlotView[] = slots.map((s, i) => ({
      id: i + 1,
      // No slot runs code newer than the pool's.
      generation: Math.min(s.generation, target.generation),
      state: s.state,
      live: s.state !== 'stopping' && !s.leaving,
      up: s.state === 'idle' || s.state === 'busy',
    }));
    return { views, target: target as PoolTarget };
  });

/** The pool after a plan: leavers no longer live, spawns live and starting on the newest code. */
function apply(views: SlotView[], target: PoolTarget, plan: ReturnType<typeof reconcile>): SlotView[] {
  const gone = new Set(plan.leave.map((l) => l.id));
  const after = views.map((v) => (gone.has(v.id) ? { ...v, live: false } : v));
  let id = Math.max(0, ...views.map((v) => v.id));
  for (let i = 0; i < plan.spawn; i++)
    after.push({ id: ++id, generation: target.generation, state: 'starting', live: true, up: false });
  return after;
}

const live = (views: SlotView[]) => views.filter((v) => v.live);
const serving = (views: SlotView[]) => views.filter((v) => v.live && v.up);

test('a plan sends away only live slots, each once, and spawns none while backing off', () => {
  fc.assert(
    fc.property(poolArb, ({ views, target }) => {
      const plan = reconcile(views, target);
      const ids = plan.leave.map((l) => l.id);
      assert.equal(new Set(ids).size, ids.length);
      for (const id of ids) assert.ok(views.find((v) => v.id === id)?.live);
      assert.ok(plan.spawn >= 0);
      if (target.backingOff) assert.equal(plan.spawn, 0);
    }),
  );
});

test('it never takes serving workers below what is asked for', () => {
  fc.assert(
    fc.property(poolArb, ({ views, target }) => {
      const after = apply(views, target, reconcile(views, target));
      assert.ok(
        serving(after).length >= Math.min(target.desired, serving(views).length),
        `${serving(views).length} serving before, ${serving(after).length} after, ${target.desired} wanted`,
      );
    }),
  );
});

const starting = (views: SlotView[]) => live(views).filter((v) => v.state === 'starting').length;

test('not backing off, it reaches the size asked for (in steps), one over at most while a roll surges', () => {
  fc.assert(
    fc.property(poolArb, ({ views, target }) => {
      fc.pre(!target.backingOff);
      const after = apply(views, target, reconcile(views, target));
      const n = live(after).length;
      const stepFull = starting(after) >= target.maxStarting;
      const rolling = live(after).some((v) => isStale(v.generation, target));
      if (rolling)
        assert.ok(
          (n >= target.desired || stepFull) && n <= Math.max(target.desired + 1, live(views).length),
          `${n}`,
        );
      else assert.ok(n === target.desired || (n < target.desired && stepFull), `${n} of ${target.desired}`);
    }),
  );
});

test('it never has more starting at once than the step allows (or than were already starting)', () => {
  fc.assert(
    fc.property(poolArb, ({ views, target }) => {
      const after = apply(views, target, reconcile(views, target));
      assert.ok(starting(after) <= Math.max(target.maxStarting, starting(views)));
    }),
  );
});

test('a second look at once changes nothing: one step is the whole step', () => {
  fc.assert(
    fc.property(poolArb, ({ views, target }) => {
      fc.pre(!target.backingOff);
      const after = apply(views, target, reconcile(views, target));
      const again = reconcile(after, target);
      assert.deepEqual(again.leave, []);
      assert.equal(again.spawn, 0);
    }),
  );
});

test('a roll replaces the oldest code first, and only once newer code serves', () => {
  fc.assert(
    fc.property(poolArb, ({ views, target }) => {
      const plan = reconcile(views, target);
      const newestUp = Math.max(-1, ...views.filter((v) => v.live && v.up).map((v) => v.generation));
      for (const { id, why } of plan.leave) {
        const v = views.find((s) => s.id === id) as SlotView;
        if (why === 'reload') assert.ok(isStale(v.generation, target));
        if (why === 'reload' && v.up && live(views).length <= target.desired)
          assert.ok(v.generation < newestUp, 'a serving old worker left with nothing newer up');
      }
    }),
  );
});

test('examples: grow, shrink starting-first, and a roll that starts one new worker', () => {
  const t: PoolTarget = {
    desired: 2,
    generation: 0,
    failedGeneration: -1,
    backingOff: false,
    maxStarting: 4,
  };
  const v = (id: number, state: SlotState, generation = 0): SlotView => ({
    id,
    generation,
    state,
    live: state !== 'stopping',
    up: state === 'idle' || state === 'busy',
  });
  assert.deepEqual(reconcile([v(1, 'idle')], t), { leave: [], spawn: 1, rollDone: true });
  assert.deepEqual(reconcile([v(1, 'busy'), v(2, 'idle'), v(3, 'starting')], t).leave, [
    { id: 3, why: 'scale' },
  ]);
  assert.deepEqual(reconcile([v(1, 'busy'), v(2, 'idle'), v(3, 'idle')], t).leave, [{ id: 2, why: 'scale' }]);
  const rolling = { ...t, generation: 1 };
  assert.deepEqual(reconcile([v(1, 'idle'), v(2, 'busy')], rolling), {
    leave: [],
    spawn: 1,
    rollDone: false,
  });
  assert.deepEqual(reconcile([v(1, 'idle'), v(2, 'busy'), v(3, 'idle', 1)], rolling), {
    leave: [{ id: 1, why: 'reload' }],
    spawn: 1,
    rollDone: false,
  });
  const failed = { ...rolling, failedGeneration: 1 };
  assert.deepEqual(reconcile([v(1, 'idle'), v(2, 'busy')], failed), { leave: [], spawn: 0, rollDone: true });
});

test('a resize to a thousand forks four at a time', () => {
  const t: PoolTarget = {
    desired: 1000,
    generation: 0,
    failedGeneration: -1,
    backingOff: false,
    maxStarting: 4,
  };
  const up: SlotView = { id: 1, generation: 0, state: 'idle', live: true, up: true };
  assert.equal(reconcile([up], t).spawn, 4);
  const booting = [2, 3, 4].map(
    (id): SlotView => ({ id, generation: 0, state: 'starting', live: true, up: false }),
  );
  assert.equal(reconcile([up, ...booting], t).spawn, 1);
});
