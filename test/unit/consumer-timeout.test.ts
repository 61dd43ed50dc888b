import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  BROKER_DEFAULT_CONSUMER_TIMEOUT_MS,
  consumerTimeoutFor,
  honoursConsumerTimeout,
  longestHoldMs,
} from '../../src/consumer-timeout.ts';

test('the consumer timeout outlasts the longest a delivery can wait here, and never undercuts the default', () => {
  // 256 deliveries per worker of 30 s tasks: over two hours held in the worst case.
  const hold = longestHoldMs({ workerTimeout: 30, killGrace: 0, perWorker: 256 });
  assert.equal(hold, 256 * 30_000);
  assert.ok((consumerTimeoutFor({ workerTimeout: 30, killGrace: 0, perWorker: 256 }) ?? 0) > hold);
  // Short tasks and a shallow window: the broker's default is already enough; ask nothing.
  assert.equal(consumerTimeoutFor({ workerTimeout: 1, killGrace: 0, perWorker: 2 }), undefined);
  assert.ok(
    (consumerTimeoutFor({ workerTimeout: 30, killGrace: 0, perWorker: 256 }) ?? 0) >
      BROKER_DEFAULT_CONSUMER_TIMEOUT_MS,
  );
  // The grace counts: a task may run its time limit plus the grace.
  assert.equal(longestHoldMs({ workerTimeout: 10, killGrace: 5, perWorker: 2 }), 30_000);
  // Capped where the broker's timer ends.
  assert.equal(consumerTimeoutFor({ workerTimeout: 2_000_000, killGrace: 0, perWorker: 256 }), 2 ** 31 - 1);
});

test('which brokers honour x-consumer-timeout on basic.consume', () => {
  for (const v of ['3.11.15', '3.12.0', '3.13.7', '4.0.5', '4.3.6', 'unknown'])
    assert.equal(honoursConsumerTimeout(v), true, v);
  for (const v of ['3.10.8', '3.11.14', '3.8.0']) assert.equal(honoursConsumerTimeout(v), false, v);
});
