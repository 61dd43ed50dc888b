// How a running task is stopped, against a fake slot that records what the stop asks of
// it: at its time limit (signal, then the kill after the grace; no grace, the kill at
// once), by a cancel, and nothing for a task that ended in time. A time limit of 0 makes
// the task due at once, so only the mocked timers decide what happens when.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { Job } from '../../../src/pool/job.ts';
import { TaskStop } from '../../../src/pool/task-stop.ts';
import { taskRequest } from '../../support/task-request.ts';

function slot(graceMs: number) {
  const asked: string[] = [];
  let running: Job | undefined;
  let ending = false;
  const stop = new TaskStop({
    log: pino({ level: 'silent' }),
    running: () => running,
    ending: () => ending,
    pid: () => 1234,
    timeoutOf: () => 0,
    graceOf: () => graceMs,
    abort: (job, reason, cancel) =>
      asked.push(`abort ${job.taskId} ${cancel ? 'cancel' : 'limit'}: ${reason}`),
    takeBack: () => asked.push('take back'),
    kill: (why) => {
      ending = true;
      asked.push(`kill ${why}`);
    },
  });
  const start = (job: Job) => {
    running = job;
    stop.started(job);
  };
  return { stop, asked, start };
}

const job = (id = 1) => new Job(id, taskRequest('f'), () => {});

test('at its time limit: the signal and the tasks behind it asked back, the kill after the grace', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  const { asked, start } = slot(500);
  const j = job();
  start(j);
  t.mock.timers.tick(0);
  assert.deepEqual(asked, ['abort 1 limit: the task reached its time limit', 'take back']);
  assert.equal(j.timedOut, true);
  t.mock.timers.tick(499);
  assert.equal(asked.length, 2, 'not killed inside its grace');
  t.mock.timers.tick(1);
  assert.deepEqual(asked.slice(2), ['kill timeout']);
});

test('with no grace the worker is killed at its time limit, with no signal first', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  const { asked, start } = slot(0);
  start(job());
  t.mock.timers.tick(0);
  assert.deepEqual(asked, ['kill timeout']);
});

test('a task that ended before its limit was checked is left alone', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  const { asked, start } = slot(500);
  const j = job();
  start(j);
  j.end({ outcome: 'succeeded', resultJson: undefined, durationMs: 0 });
  t.mock.timers.tick(1_000);
  assert.deepEqual(asked, []);
});

test('a cancel: the signal marked as a cancel, the kill after the grace unless it ends', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  const { stop, asked, start } = slot(300);
  const j = job();
  start(j);
  j.cancelled = true;
  stop.cancelled(j);
  assert.deepEqual(asked, ['abort 1 cancel: the task was cancelled', 'take back']);
  t.mock.timers.tick(300);
  assert.deepEqual(asked.slice(2), ['kill cancel'], 'a cancelled task is never a timeout');

  const other = slot(300);
  const k = job(2);
  other.start(k);
  k.cancelled = true;
  other.stop.cancelled(k);
  k.end({ outcome: 'cancelled', error: { name: 'AbortError', message: 'x' }, durationMs: 1 });
  t.mock.timers.tick(300);
  assert.deepEqual(
    other.asked,
    ['abort 2 cancel: the task was cancelled', 'take back'],
    'ended in its grace: no kill',
  );
});

test('a task cancelled while it waited is stopped as soon as it starts', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  const { asked, start } = slot(300);
  const j = job();
  j.cancelled = true;
  start(j);
  await Promise.resolve();
  assert.deepEqual(asked, ['abort 1 cancel: the task was cancelled', 'take back']);
});
