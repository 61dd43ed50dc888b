// The tasks one worker holds: whichever way a task leaves the list, the task that becomes
// the first is started (its clock), once, and nothing else is.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { HeldJobs } from '../../../src/pool/held-jobs.ts';
import { Job } from '../../../src/pool/job.ts';
import { taskRequest } from '../../support/task-request.ts';

function held() {
  const started: number[] = [];
  const jobs = new HeldJobs((job) => started.push(job.taskId));
  return { jobs, started };
}

const job = (id: number) => new Job(id, taskRequest('f'), () => {});

test('the first task handed to an idle worker starts; those added behind it do not', () => {
  const { jobs, started } = held();
  const [a, b, c] = [job(1), job(2), job(3)];
  jobs.add([a, b]);
  jobs.add([c]);
  assert.deepEqual(started, [1]);
  assert.equal(jobs.running, a);
  assert.equal(jobs.count, 3);
});

test('a result for the running task: it leaves and the next starts; any other result changes nothing', () => {
  const { jobs, started } = held();
  jobs.add([job(1), job(2)]);
  assert.equal(jobs.finish(2), undefined, 'a result for a task behind the running one is forged');
  assert.equal(jobs.count, 2);
  assert.equal(jobs.finish(1)?.taskId, 1);
  assert.deepEqual(started, [1, 2]);
  assert.equal(jobs.finish(2)?.taskId, 2);
  assert.deepEqual(started, [1, 2], 'nothing left to start');
  assert.equal(jobs.finish(3), undefined, 'a result when nothing runs');
});

test('taking out the running task starts the next; taking out one behind it starts nothing', () => {
  const { jobs, started } = held();
  const [a, b, c] = [job(1), job(2), job(3)];
  jobs.add([a, b, c]);
  assert.deepEqual(
    jobs.remove((j) => j === c),
    [c],
  );
  assert.deepEqual(started, [1]);
  assert.deepEqual(
    jobs.remove((j) => j === a),
    [a],
  );
  assert.deepEqual(started, [1, 2]);
  assert.deepEqual(
    jobs.remove(() => false),
    [],
  );
  assert.deepEqual(started, [1, 2]);
});

test('holdsAll names only held tasks; takeAll empties the list, the running task first', () => {
  const { jobs, started } = held();
  jobs.add([job(1), job(2)]);
  assert.equal(jobs.holdsAll([2, 1]), true);
  assert.equal(jobs.holdsAll([2, 9]), false);
  assert.deepEqual(
    jobs.takeAll().map((j) => j.taskId),
    [1, 2],
  );
  assert.equal(jobs.count, 0);
  assert.equal(jobs.running, undefined);
  jobs.add([job(3)]);
  assert.deepEqual(started, [1, 3], 'an emptied worker starts the next task handed to it');
});
