// What a task's end means, from what the master saw: a result line from its child, or
// the exit of its child's process while it ran. A task cancelled or past its time limit
// ends as that, whatever came after; a kill of ours for another reason is not the
// task's fault and gives it back; only a death the master did not cause is a crash.
import { taskFailure } from '../errors.ts';
import type { ResultLine } from '../ipc/protocol.ts';
import type { Job, JobResult } from './job.ts';
import type { KillReason } from './slot.ts';

/** The end of a task whose child reported it. */
export function endOfResult(job: Job, line: ResultLine, durationMs: number, timeoutMs: number): JobResult {
  if (job.cancelled) return { outcome: 'cancelled', error: taskFailure.cancelled(true), durationMs };
  if (job.timedOut) return { outcome: 'timeout', error: taskFailure.timeout(timeoutMs, true), durationMs };
  if (line.ok) return { outcome: 'succeeded', resultJson: line.resultJson, durationMs };
  return { outcome: 'failed', error: line.error, durationMs };
}

/** How the process of a running task ended, and why the master had stopped it (if it had). */
export interface ProcessEnd {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Undefined: it died by itself. */
  killedFor: KillReason | undefined;
  /** What the child did wrong, when it was killed for breaking the protocol. */
  protocolProblem: string | undefined;
}

/** The end of the task that was running when its process ended. */
export function endAtExit(job: Job, end: ProcessEnd, timeoutMs: number): JobResult {
  const durationMs = job.startedAt === 0 ? 0 : performance.now() - job.startedAt;
  if (job.cancelled) return { outcome: 'cancelled', error: taskFailure.cancelled(true), durationMs };
  if (job.timedOut) return { outcome: 'timeout', error: taskFailure.timeout(timeoutMs, false), durationMs };
  if (end.killedFor === 'shutdown')
    return { outcome: 'returned', reason: 'still running at the shutdown deadline' };
  if (end.killedFor === 'protocol')
    return {
      outcome: 'crashed',
      error: taskFailure.protocol(end.protocolProblem ?? 'a malformed frame'),
      durationMs,
    };
  // Killed for another task's timeout, whose result then turned up in the pipe: this
  // one was not at fault, and goes back to the queue.
  if (end.killedFor !== undefined) return { outcome: 'returned', reason: 'its worker was stopped' };
  return { outcome: 'crashed', error: taskFailure.crashed(signalOrCode(end)), durationMs };
}

function signalOrCode(end: ProcessEnd): string {
  return end.signal ?? `exit code ${end.code}`;
}
