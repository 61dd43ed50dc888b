// Where a failed attempt's retry goes (README "Retries", "Per-task options"): the service's
// retry queues by the flags; or, for a function with retry options of its own, the retry
// queue of the same delay when the service has one, else the delay queues (amqp/delay.ts),
// stamped with the time it may run. Pure, so that each case is a unit test.
import { DELAY_STEPS_MS, delayQueueName, delayStep } from '../amqp/delay.ts';
import { retryDelayMs, retryQueueName } from '../amqp/topology.ts';
import type { TaskLimits } from '../ipc/task-options.ts';

export interface RetryPolicy {
  /** The work queue. */
  queue: string;
  /** The flags' delays: retry k at index k-1 (empty when retries are off). */
  delaysMs: readonly number[];
  /** --retry-delay and --retry-delay-max, in ms, for what a function does not set itself. */
  baseMs: number;
  maxMs: number;
}

export interface RetryRoute {
  /** Where the retry copy is published (default exchange). */
  queue: string;
  delayMs: number;
  /** Through the delay queues: when it may run (ms since the epoch), and the queue's TTL. */
  until?: number;
  step?: number;
}

/** The retry of attempt `attempt` (1-based), or undefined when it is the last. */
export function retryRoute(
  attempt: number,
  own: TaskLimits | undefined,
  policy: RetryPolicy,
  now: number,
): RetryRoute | undefined {
  const { queue, delaysMs } = policy;
  if (
    own === undefined ||
    (own.maxRetries === undefined && own.retryDelayMs === undefined && own.retryDelayMaxMs === undefined)
  ) {
    const delayMs = delaysMs[attempt - 1];
    return delayMs === undefined ? undefined : { queue: retryQueueName(queue, delayMs), delayMs };
  }
  if (attempt > (own.maxRetries ?? delaysMs.length)) return undefined;
  const delayMs = retryDelayMs(
    attempt,
    own.retryDelayMs ?? policy.baseMs,
    own.retryDelayMaxMs ?? policy.maxMs,
  );
  if (delaysMs.includes(delayMs)) return { queue: retryQueueName(queue, delayMs), delayMs };
  // No wait to speak of: straight back to the work queue.
  if (delayMs < (DELAY_STEPS_MS[0] as number) / 2) return { queue, delayMs: 0 };
  const step = delayStep(delayMs);
  return { queue: delayQueueName(queue, step), delayMs, until: now + delayMs, step };
}
