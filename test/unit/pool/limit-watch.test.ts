// The slot's one time-limit timer: it fires by the earliest time asked for, keeps an
// earlier one when asked for a later, fires once, and stops.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LimitWatch } from '../../../src/pool/limit-watch.ts';

test('the watch fires once, by the earliest time it was asked for; a later ask keeps it; stop ends it', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const fired: number[] = [];
  let now = 0;
  const watch = new LimitWatch(() => fired.push(now));
  watch.watch(100, 0);
  watch.watch(500, 0); // later: kept at 100
  now = 99;
  t.mock.timers.tick(99);
  assert.deepEqual(fired, []);
  now = 100;
  t.mock.timers.tick(1);
  assert.deepEqual(fired, [100]);
  now = 1_000;
  t.mock.timers.tick(900);
  assert.deepEqual(fired, [100], 'once');

  watch.watch(300, 0);
  watch.watch(50, 0); // earlier: moved
  t.mock.timers.tick(50);
  assert.equal(fired.length, 2);
  t.mock.timers.tick(500);
  assert.equal(fired.length, 2, 'the earlier ask replaced the later one');

  watch.watch(10, 0);
  watch.stop();
  t.mock.timers.tick(100);
  assert.equal(fired.length, 2, 'stopped');
  watch.watch(10, 0);
  t.mock.timers.tick(10);
  assert.equal(fired.length, 3, 'and can be set again');
});
