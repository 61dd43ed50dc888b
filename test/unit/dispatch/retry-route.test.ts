// Where a retry goes: by the flags, or by a function's own retry options.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { retryRoute } from '../../../src/dispatch/retry-route.ts';

const policy = { queue: 'q', delaysMs: [1_000, 2_000], baseMs: 1_000, maxMs: 300_000 };

test('by the flags: the retry queue of each attempt, none after the last', () => {
  assert.deepEqual(retryRoute(1, undefined, policy, 0), { queue: 'q.retry.1000ms', delayMs: 1_000 });
  assert.deepEqual(retryRoute(2, { concurrency: 1 }, policy, 0), { queue: 'q.retry.2000ms', delayMs: 2_000 });
  assert.equal(retryRoute(3, undefined, policy, 0), undefined);
});

test("by a function's own options: the service's queue of that delay, else the delay queues, else straight back", () => {
  assert.deepEqual(retryRoute(2, { maxRetries: 5 }, policy, 0), { queue: 'q.retry.2000ms', delayMs: 2_000 });
  assert.deepEqual(retryRoute(1, { maxRetries: 2, retryDelayMs: 300 }, policy, 10), {
    queue: 'q.delay.100ms',
    delayMs: 300,
    until: 310,
    step: 100,
  });
  assert.deepEqual(retryRoute(3, { maxRetries: 5, retryDelayMs: 1_000, retryDelayMaxMs: 2_500 }, policy, 0), {
    queue: 'q.delay.1600ms',
    delayMs: 2_500,
    until: 2_500,
    step: 1_600,
  });
  assert.deepEqual(retryRoute(1, { maxRetries: 1, retryDelayMs: 0 }, policy, 0), { queue: 'q', delayMs: 0 });
  assert.equal(retryRoute(3, { maxRetries: 2 }, policy, 0), undefined);
  assert.equal(
    retryRoute(1, { retryDelayMs: 500 }, { ...policy, delaysMs: [] }, 0),
    undefined,
    'no retries by the flags',
  );
});
