// Readiness (README "HTTP"): what /health answers, from what the pool, the consuming
// connection and the drain say. Pure, so that each rule is tested by itself: a worker
// being replaced (a timeout, a recycle, a reload) is normal operation, not a reason; only
// no worker up at all, or replacements that keep failing to start, are.
import type { ConsumerState } from '../amqp/consumer.ts';
import type { HealthReport } from '../http/server.ts';
import type { PoolStats } from '../pool/pool.ts';

/** What readiness is decided from, read at the moment of the request. */
export interface HealthInputs {
  pool: Pick<PoolStats, 'desired' | 'starting' | 'idle' | 'busy' | 'bootFailures'>;
  consumer: { state: ConsumerState; connected: boolean; blocked: boolean; paused: boolean; broker?: string };
  /** Publishing blocked by a memory or disk alarm. */
  publisherBlocked: boolean;
  tasksInFlight: number;
  draining: boolean;
}

export function healthReport(inputs: HealthInputs): HealthReport {
  const { pool, consumer } = inputs;
  const up = pool.idle + pool.busy;
  const report: HealthReport = {
    status: 'ok',
    amqp: {
      connected: consumer.connected,
      blocked: consumer.blocked || inputs.publisherBlocked,
      paused: consumer.paused,
      ...(consumer.broker === undefined ? {} : { broker: consumer.broker }),
    },
    workers: { desired: pool.desired, up, busy: pool.busy },
    tasksInFlight: inputs.tasksInFlight,
  };
  if (inputs.draining) return { ...report, status: 'draining', reason: 'the service is shutting down' };
  if (consumer.state === 'connecting')
    return { ...report, status: 'connecting', reason: 'connecting to the broker' };
  if (consumer.state !== 'consuming')
    return { ...report, status: 'reconnecting', reason: 'the broker connection was lost' };
  if (pool.bootFailures > 0) {
    return {
      ...report,
      status: 'workers down',
      reason: `workers failing to start (${pool.bootFailures} in a row); ${up} of ${pool.desired} up`,
    };
  }
  // With one worker, its replacement (after a timeout or a recycle) leaves none up for a
  // moment: a replacement on its way is normal operation, not a reason; none at all is.
  if (up === 0 && pool.starting === 0)
    return { ...report, status: 'workers down', reason: `no worker up (0 of ${pool.desired})` };
  return report;
}
