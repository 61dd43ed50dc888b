import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  consumerTimeoutPolicyCommand,
  honoursConsumerTimeout,
  isConsumerTimeoutArgumentClash,
  isConsumerTimeoutClose,
  longestHoldMs,
  neededConsumerTimeoutMs,
  sendsConsumerTimeout,
} from '../../../src/amqp/consumer-timeout.ts';

test('the consumer timeout outlasts the longest a delivery can wait here, whatever the broker default', () => {
  // 256 deliveries per worker of 30 s tasks: over two hours held in the worst case.
  const hold = longestHoldMs({ workerTimeout: 30, killGrace: 0, perWorker: 256 });
  assert.equal(hold, 256 * 30_000);
  assert.ok(neededConsumerTimeoutMs({ workerTimeout: 30, killGrace: 0, perWorker: 256 }) > hold);
  // Short tasks and a shallow window still ask: an operator may have lowered the broker's value.
  assert.equal(neededConsumerTimeoutMs({ workerTimeout: 1, killGrace: 0, perWorker: 2 }), 2_000 + 300_000);
  // The grace counts: a task may run its time limit plus the grace.
  assert.equal(longestHoldMs({ workerTimeout: 10, killGrace: 5, perWorker: 2 }), 30_000);
  // Capped where the broker's timer ends.
  assert.equal(
    neededConsumerTimeoutMs({ workerTimeout: 2_000_000, killGrace: 0, perWorker: 256 }),
    2 ** 31 - 1,
  );
});

test('x-consumer-timeout is sent where it is honoured: not before 3.11.15, not on a classic queue from 4.3', () => {
  for (const type of ['classic', 'quorum'] as const) {
    assert.equal(sendsConsumerTimeout('3.10.8', type), false);
    assert.equal(sendsConsumerTimeout('3.13.7', type), true);
    assert.equal(sendsConsumerTimeout('4.0.5', type), true);
    assert.equal(sendsConsumerTimeout('4.2.1', type), true);
  }
  assert.equal(sendsConsumerTimeout('4.3.6', 'classic'), false);
  assert.equal(sendsConsumerTimeout('4.3.6', 'quorum'), true);
  assert.equal(sendsConsumerTimeout('5.0.0', 'classic'), false);
  assert.equal(sendsConsumerTimeout(undefined, 'quorum'), true);
  const clash = Object.assign(
    new Error(
      `Operation failed: QueueDeclare; 406 (PRECONDITION-FAILED) with message "PRECONDITION_FAILED - inequivalent arg 'x-consumer-timeout' for queue 'q'"`,
    ),
    { code: 406 },
  );
  assert.equal(isConsumerTimeoutArgumentClash(clash), true);
  assert.equal(
    isConsumerTimeoutArgumentClash(
      Object.assign(new Error("inequivalent arg 'x-queue-type'"), { code: 406 }),
    ),
    false,
  );
  assert.equal(isConsumerTimeoutArgumentClash(new Error('x-consumer-timeout but no code')), false);
});

test('which brokers honour x-consumer-timeout on basic.consume', () => {
  for (const v of ['3.11.15', '3.12.0', '3.13.7', '4.0.5', '4.3.6', 'unknown'])
    assert.equal(honoursConsumerTimeout(v), true, v);
  for (const v of ['3.10.8', '3.11.14', '3.8.0']) assert.equal(honoursConsumerTimeout(v), false, v);
});

test('the broker closing a channel for its consumer timeout is recognised, and the fix is a policy command for this queue', () => {
  const close =
    'Channel closed by server: 406 (PRECONDITION-FAILED) with message "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 5000 ms. This timeout value can be configured, see consumers doc guide to learn more"';
  assert.equal(isConsumerTimeoutClose(close), true);
  assert.equal(
    isConsumerTimeoutClose(
      'Channel closed by server: 406 (PRECONDITION-FAILED) with message "inequivalent arg"',
    ),
    false,
  );
  assert.equal(
    consumerTimeoutPolicyCommand('jobs.main', 3_600_000),
    `rabbitmqctl set_policy amqp-concurrency-consumer-timeout '^jobs\\.main$' '{"consumer-timeout": 3600000}' --apply-to queues`,
  );
  assert.equal(
    neededConsumerTimeoutMs({ workerTimeout: 30, killGrace: 0, perWorker: 4 }),
    4 * 30_000 + 5 * 60_000,
    'every delivery a worker may hold, each up to its limit, and five minutes of room',
  );
});
