import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type HealthInputs, healthReport } from '../../../src/service/health.ts';

/** Two workers up and idle, consuming, nothing in flight: ready. */
function inputs(
  change: { pool?: Partial<HealthInputs['pool']>; consumer?: Partial<HealthInputs['consumer']> } & Partial<
    Omit<HealthInputs, 'pool' | 'consumer'>
  > = {},
): HealthInputs {
  return {
    publisherBlocked: false,
    tasksInFlight: 0,
    draining: false,
    ...change,
    pool: { desired: 2, starting: 0, idle: 2, busy: 0, bootFailures: 0, ...change.pool },
    consumer: { state: 'consuming', connected: true, blocked: false, paused: false, ...change.consumer },
  };
}

test('consuming with workers up is ok, and the report says what it saw', () => {
  const report = healthReport(
    inputs({ pool: { idle: 1, busy: 1 }, consumer: { broker: 'rabbit@a' }, tasksInFlight: 3 }),
  );
  assert.deepEqual(report, {
    status: 'ok',
    amqp: { connected: true, blocked: false, paused: false, broker: 'rabbit@a' },
    workers: { desired: 2, up: 2, busy: 1 },
    tasksInFlight: 3,
  });
});

test('a blocked publisher shows as blocked, and paused consuming as paused: neither is a reason', () => {
  const report = healthReport(inputs({ publisherBlocked: true, consumer: { paused: true } }));
  assert.equal(report.status, 'ok');
  assert.deepEqual(report.amqp, { connected: true, blocked: true, paused: true });
});

test('each state of the consuming connection that is not consuming is its own status', () => {
  assert.equal(
    healthReport(inputs({ consumer: { state: 'connecting', connected: false } })).status,
    'connecting',
  );
  for (const state of ['reconnecting', 'cancelled', 'closed'] as const) {
    const report = healthReport(inputs({ consumer: { state, connected: false } }));
    assert.deepEqual(
      [report.status, report.reason],
      ['reconnecting', 'the broker connection was lost'],
      state,
    );
  }
});

test('a drain comes first, whatever else is wrong', () => {
  const report = healthReport(
    inputs({ draining: true, consumer: { state: 'reconnecting' }, pool: { idle: 0, bootFailures: 3 } }),
  );
  assert.deepEqual([report.status, report.reason], ['draining', 'the service is shutting down']);
});

test('a worker being replaced is not a reason; none up and none on its way is', () => {
  // One worker, replaced after a timeout: none up for a moment, its replacement starting.
  assert.equal(healthReport(inputs({ pool: { desired: 1, idle: 0, starting: 1 } })).status, 'ok');
  const none = healthReport(inputs({ pool: { desired: 1, idle: 0, starting: 0 } }));
  assert.deepEqual([none.status, none.reason], ['workers down', 'no worker up (0 of 1)']);
});

test('replacements that keep failing to start are a reason, with how many are up', () => {
  const report = healthReport(inputs({ pool: { idle: 1, bootFailures: 4 } }));
  assert.deepEqual(
    [report.status, report.reason],
    ['workers down', 'workers failing to start (4 in a row); 1 of 2 up'],
  );
});
