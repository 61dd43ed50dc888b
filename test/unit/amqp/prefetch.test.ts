import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import {
  AutoPrefetch,
  autoPrefetch,
  defaultPrefetch,
  HOLD_MS,
  MAX_PER_WORKER,
  MAX_PREFETCH,
  MIN_PER_WORKER,
  worthRetuning,
} from '../../../src/amqp/prefetch.ts';

test('the window holds about HOLD_MS of work per worker, within its bounds', () => {
  assert.equal(autoPrefetch(2, undefined), defaultPrefetch(2), 'untimed: the safe default');
  assert.equal(autoPrefetch(2, 0.01), 2 * MAX_PER_WORKER, 'tiny tasks: deep');
  assert.equal(autoPrefetch(8, 0.01), MAX_PREFETCH, 'never over the cap in all');
  assert.equal(autoPrefetch(2, 10), 2 * (HOLD_MS / 10), '10 ms tasks: a second of them each');
  assert.equal(autoPrefetch(4, 60_000), 4 * MIN_PER_WORKER, 'long tasks: the running one and the next');
  assert.equal(autoPrefetch(1, 0), MAX_PER_WORKER, 'a zero average is not a division by zero');
});

test('retuned only on a change of half or more', () => {
  assert.equal(worthRetuning(64, 512), true);
  assert.equal(worthRetuning(512, 64), true);
  assert.equal(worthRetuning(100, 120), false);
  assert.equal(worthRetuning(100, 80), false);
});

test('a smaller window gives back what is held beyond it; a larger one gives back nothing', async () => {
  const calls: string[] = [];
  const pool = {
    size: 2,
    averageTaskMs: 0.01 as number | undefined,
    giveBack(count: number) {
      calls.push(`giveBack ${count}`);
      return count;
    },
  };
  const consumer = {
    prefetch: 64,
    async setPrefetch(count: number) {
      calls.push(`prefetch ${count}`);
      this.prefetch = count;
    },
  };
  let unsettled = 64;
  const auto = new AutoPrefetch({
    logger: pino({ level: 'silent' }),
    pool,
    consumer,
    unsettled: () => unsettled,
  });
  auto.retune();
  assert.deepEqual(calls, [`prefetch ${2 * MAX_PER_WORKER}`]);
  unsettled = 2 * MAX_PER_WORKER;
  auto.retune();
  assert.equal(calls.length, 1, 'unchanged: nothing to do');
  pool.averageTaskMs = 100; // the tasks turned long: 2 × 10
  auto.retune();
  assert.deepEqual(calls.slice(1), ['prefetch 20', `giveBack ${2 * MAX_PER_WORKER - 20}`]);
});

test('with a memory budget, the window fits the largest body until one is seen, then the average', () => {
  const set: number[] = [];
  const consumer = {
    prefetch: 2, // start-up's window: 16 MiB at 8 MiB each
    async setPrefetch(count: number) {
      set.push(count);
      this.prefetch = count;
    },
  };
  let average: number | undefined;
  const auto = new AutoPrefetch({
    logger: pino({ level: 'silent' }),
    pool: { size: 1, averageTaskMs: undefined, giveBack: () => 0 },
    consumer,
    unsettled: () => 0,
    memory: { budgetBytes: 16 * 2 ** 20, largestBodyBytes: 8 * 2 ** 20, averageBodyBytes: () => average },
  });
  auto.retune();
  assert.deepEqual(set, [], `no body yet: still 2, not the ${defaultPrefetch(1)} of an untimed pool`);
  average = 1 * 2 ** 20;
  auto.retune();
  assert.deepEqual(set, [16], 'bodies of 1 MiB: 16 fit');
});
