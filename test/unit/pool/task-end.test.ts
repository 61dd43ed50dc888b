// What a task's end means: every row of the table, from a result line and from an exit,
// with the cancel and the time limit taking precedence over whatever came after them.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Job, type JobResult } from '../../../src/pool/job.ts';
import type { KillReason } from '../../../src/pool/slot.ts';
import { endAtExit, endOfResult, type ProcessEnd } from '../../../src/pool/task-end.ts';
import { taskRequest } from '../../support/task-request.ts';

function job(mark: { cancelled?: boolean; timedOut?: boolean } = {}): Job {
  const j = new Job(1, taskRequest('f'), () => {});
  j.startedAt = performance.now() - 10;
  j.cancelled = mark.cancelled ?? false;
  j.timedOut = mark.timedOut ?? false;
  return j;
}

const ok = { taskId: 1, ok: true as const, resultJson: '3' };
const failed = { taskId: 1, ok: false as const, error: { name: 'Error', message: 'no' } };
const exit = (killedFor: KillReason | undefined, more: Partial<ProcessEnd> = {}): ProcessEnd => ({
  code: null,
  signal: 'SIGKILL',
  killedFor,
  protocolProblem: undefined,
  ...more,
});
const outcome = (r: JobResult) => r.outcome;
const code = (r: JobResult) => ('error' in r ? r.error.code : undefined);

test('from a result line: succeeded or failed, unless the task was cancelled or past its limit first', () => {
  const succeeded = endOfResult(job(), ok, 12, 5_000);
  assert.deepEqual(succeeded, { outcome: 'succeeded', resultJson: '3', durationMs: 12 });
  assert.deepEqual(endOfResult(job(), failed, 12, 5_000), {
    outcome: 'failed',
    error: failed.error,
    durationMs: 12,
  });
  const cancelled = endOfResult(job({ cancelled: true }), ok, 12, 5_000);
  assert.equal(outcome(cancelled), 'cancelled');
  assert.equal(code(cancelled), 'ERR_TASK_CANCELLED');
  const late = endOfResult(job({ timedOut: true }), ok, 12, 5_000);
  assert.equal(outcome(late), 'timeout');
  assert.match(late.outcome === 'timeout' ? late.error.message : '', /5 s/);
});

test('from an exit: a death of its own is a crash; a kill of ours gives back, ends or blames as its reason says', () => {
  const died = endAtExit(job(), exit(undefined, { signal: null, code: 3 }), 5_000);
  assert.equal(outcome(died), 'crashed');
  assert.match(died.outcome === 'crashed' ? died.error.message : '', /exit code 3/);
  assert.match(
    (endAtExit(job(), exit(undefined), 5_000) as { error: { message: string } }).error.message,
    /SIGKILL/,
  );
  assert.deepEqual(endAtExit(job(), exit('shutdown'), 5_000), {
    outcome: 'returned',
    reason: 'still running at the shutdown deadline',
  });
  const breach = endAtExit(job(), exit('protocol', { protocolProblem: 'a forged result' }), 5_000);
  assert.equal(outcome(breach), 'crashed');
  assert.match(breach.outcome === 'crashed' ? breach.error.message : '', /a forged result/);
  // Killed for another task's time limit, or retired: not this task's fault.
  for (const why of ['timeout', 'retired', 'cancel'] as const)
    assert.deepEqual(endAtExit(job(), exit(why), 5_000), {
      outcome: 'returned',
      reason: 'its worker was stopped',
    });
  // Its own cancel or time limit comes first, whatever the kill was for.
  assert.equal(outcome(endAtExit(job({ cancelled: true }), exit('cancel'), 5_000)), 'cancelled');
  assert.equal(outcome(endAtExit(job({ timedOut: true }), exit('timeout'), 5_000)), 'timeout');
  assert.equal(outcome(endAtExit(job({ timedOut: true }), exit('shutdown'), 5_000)), 'timeout');
  // Not started yet (handed over, never begun): no duration to speak of.
  const unstarted = job();
  unstarted.startedAt = 0;
  const never = endAtExit(unstarted, exit(undefined), 5_000);
  assert.equal(never.outcome === 'crashed' ? never.durationMs : -1, 0);
});
