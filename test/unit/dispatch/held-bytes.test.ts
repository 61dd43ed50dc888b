import assert from 'node:assert/strict';
import { test } from 'node:test';
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

test('idle after a burst: one collection a moment later, not at once; none if busy again by then', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'] });
  const { held, collections } = heldBytes();
  let inFlight = 0;
  const idle = () => inFlight === 0;
  const burst = (bodies: number) => {
    for (let i = 0; i < bodies; i++) held.take(4 * MiB);
    inFlight = bodies;
    for (let i = 0; i < bodies; i++) {
      inFlight--;
      held.release(4 * MiB, idle);
    }
  };
  burst(2);
  t.mock.timers.tick(10_000);
  assert.equal(collections(), 0, '8 MiB is no burst');
  burst(8);
  assert.equal(collections(), 0, 'not at once: the last acks still keep their bodies until fenced');
  t.mock.timers.tick(1_000);
  assert.equal(collections(), 1);
  // Within five seconds of it, a second burst's collection waits for their end.
  burst(8);
  t.mock.timers.tick(1_000);
  assert.equal(collections(), 1);
  inFlight = 1; // busy again when the time comes: none now…
  t.mock.timers.tick(4_000);
  assert.equal(collections(), 1);
  inFlight = 0; // …and the next release that leaves nothing in flight asks again
  held.take(1);
  held.release(1, idle);
  t.mock.timers.tick(1_000);
  assert.equal(collections(), 2);
});

test('no budget: never pressured', () => {
  const { held, pressure } = heldBytes(undefined);
  held.take(1024 * MiB);
  held.release(1024 * MiB, () => true);
  assert.deepEqual(pressure, []);
  assert.equal(held.averageBody, 1024 * MiB);
});
