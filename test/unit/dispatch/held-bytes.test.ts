import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import pino from 'pino';
import { HeldBytes } from '../../../src/dispatch/held-bytes.ts';

const MiB = 2 ** 20;

function heldBytes(budget?: number) {
  let collections = 0;
  const pressure: boolean[] = [];
  const held = new HeldBytes({
    budget,
    onPressure: (over) => pressure.push(over),
    logger: pino({ level: 'silent' }),
    collect: () => collections++,
  });
  return { held, pressure, collections: () => collections };
}

/** A master on mocked timers: bodies of 4 MiB come in and are settled, one by one or at once. */
function idleMaster(t: TestContext) {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_000_000_000 });
  const { held, collections } = heldBytes();
  let inFlight = 0;
  const idle = () => inFlight === 0;
  return {
    held,
    collections,
    take(bodies = 1) {
      for (let i = 0; i < bodies; i++) held.take(4 * MiB);
      inFlight += bodies;
    },
    settle(bodies = 1) {
      for (let i = 0; i < bodies; i++) {
        inFlight--;
        held.release(4 * MiB, idle);
      }
    },
    burst(bodies: number) {
      this.take(bodies);
      this.settle(bodies);
    },
    tick: (ms: number) => t.mock.timers.tick(ms),
  };
}

test('past the budget consuming pauses; it resumes under half, not before', () => {
  const { held, pressure } = heldBytes(10 * MiB);
  held.take(6 * MiB);
  held.take(6 * MiB);
  assert.deepEqual(pressure, [true]);
  held.take(1 * MiB);
  assert.deepEqual(pressure, [true], 'once, not per body');
  held.release(6 * MiB, () => false);
  assert.deepEqual(pressure, [true], '7 MiB: under the budget, not under half');
  held.release(6 * MiB, () => false);
  assert.deepEqual(pressure, [true, false]);
  assert.equal(held.held, 1 * MiB);
});

test('idle after a burst: one collection a second later, not at once', (t) => {
  const m = idleMaster(t);
  m.burst(2);
  m.tick(10_000);
  assert.equal(m.collections(), 0, '8 MiB is no burst');
  m.burst(8);
  assert.equal(m.collections(), 0, 'not at once: the last acks still keep their bodies until fenced');
  m.tick(999);
  assert.equal(m.collections(), 0);
  m.tick(1);
  assert.equal(m.collections(), 1);
});

test('a body that comes in during the quiet second starts it again, even if settled by its end', (t) => {
  const m = idleMaster(t);
  m.burst(8);
  m.tick(500);
  m.take();
  m.tick(490);
  m.settle(); // idle again 10 ms before the second is up: its acks are not fenced yet
  m.tick(10);
  assert.equal(m.collections(), 0);
  m.tick(999);
  assert.equal(m.collections(), 0, 'the timer saw it come in: a whole quiet second again from then');
  m.tick(1);
  assert.equal(m.collections(), 1);
});

test('busy when the second is up: the collection waits for a quiet second, with no release asking again', (t) => {
  const m = idleMaster(t);
  m.burst(8);
  m.take();
  m.tick(1_000);
  assert.equal(m.collections(), 0);
  m.tick(5_000);
  assert.equal(m.collections(), 0, 'still busy');
  m.settle(); // the release itself is below the threshold's count again: only the timer remains
  m.tick(1_000);
  assert.equal(m.collections(), 1);
});

test('at most one collection per five seconds: a request inside them waits for their end, never dropped', (t) => {
  const m = idleMaster(t);
  m.burst(8);
  m.tick(1_000);
  assert.equal(m.collections(), 1);
  m.burst(8);
  m.tick(1_000);
  assert.equal(m.collections(), 1, 'inside five seconds of the last');
  m.tick(3_999);
  assert.equal(m.collections(), 1);
  m.tick(1);
  assert.equal(m.collections(), 2, 'at their end, with no release asking again');
});

test('a clock set back waits five seconds at most', (t) => {
  const m = idleMaster(t);
  m.burst(8);
  m.tick(1_000);
  assert.equal(m.collections(), 1);
  t.mock.timers.setTime(Date.now() - 3_600_000); // an hour back
  m.burst(8);
  m.tick(5_000);
  assert.equal(m.collections(), 2);
});

test('closed (draining): no collection later', (t) => {
  const m = idleMaster(t);
  m.burst(8);
  m.held.close();
  m.tick(10_000);
  m.burst(8);
  m.tick(10_000);
  assert.equal(m.collections(), 0);
});

test('no budget: never pressured', () => {
  const { held, pressure } = heldBytes(undefined);
  held.take(1024 * MiB);
  held.release(1024 * MiB, () => true);
  assert.deepEqual(pressure, []);
  assert.equal(held.averageBody, 1024 * MiB);
});
