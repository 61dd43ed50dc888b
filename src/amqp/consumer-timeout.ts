// RabbitMQ's delivery-acknowledgement timeout (consumer_timeout, 30 min by default): a
// delivery held unacked longer than it makes the broker close the channel (up to 4.2),
// or cancel the consumer (4.3, quorum queues), and the message comes back while it still
// runs here: it runs again beside itself, or ends both succeeded and dead-lettered by a
// quorum queue's delivery limit. The service owns the deadline of each task
// (--worker-timeout), so the broker's must never fire first, whatever an operator set as
// the broker's global value (often lowered, to catch stuck consumers):
//
// - the work queue is declared with `x-consumer-timeout` (3.12 and later; min'ed with a
//   `consumer-timeout` policy), so the queue says what it needs;
// - basic.consume carries it too (3.11.15 and later), which beats the queue's argument, a
//   policy and the global value alike;
// - RabbitMQ 4.3 has consumer timeouts on quorum queues only, and refuses the argument on a
//   classic queue (which no longer times out): there neither is sent;
// - 3.10 ignores both: there the closure is recognised and the fix said once (timeout-notices.ts).

/** RabbitMQ's default consumer_timeout. */
export const BROKER_DEFAULT_CONSUMER_TIMEOUT_MS = 30 * 60_000;
/** What a consumer timeout may be at most (the broker keeps it in a 32-bit timer). */
const MAX_TIMEOUT_MS = 2 ** 31 - 1;
/** Room beyond the worst case: settling (a dead letter, a reply) takes its time too. */
const SLACK_MS = 5 * 60_000;

export interface HoldLimits {
  /** Seconds. */
  workerTimeout: number;
  /** Seconds of soft limit before the kill. */
  killGrace: number;
  /** Deliveries one worker may have waiting, the running one included, at most. */
  perWorker: number;
}

/**
 * The longest a delivery can be held unacked here: it waits behind the others of its
 * worker, each up to its time limit and grace, then runs as long itself.
 */
export function longestHoldMs({ workerTimeout, killGrace, perWorker }: HoldLimits): number {
  return Math.max(1, perWorker) * (workerTimeout + killGrace) * 1000;
}

/** The consumer timeout the queue needs, whatever the broker's default: the longest hold and some room. */
export function neededConsumerTimeoutMs(limits: HoldLimits): number {
  return Math.min(MAX_TIMEOUT_MS, longestHoldMs(limits) + SLACK_MS);
}

/** Whether a channel was closed by the broker's delivery-acknowledgement timeout (RabbitMQ 3.8 to 4.2). */
export function isConsumerTimeoutClose(message: string): boolean {
  return /delivery acknowledgement on channel \d+ timed out/i.test(message);
}

/** The command that gives `queue` a consumer timeout of `ms` by policy (what works on every version from 3.12). */
export function consumerTimeoutPolicyCommand(queue: string, ms: number): string {
  const pattern = `^${queue.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`;
  return `rabbitmqctl set_policy amqp-concurrency-consumer-timeout '${pattern}' '{"consumer-timeout": ${ms}}' --apply-to queues`;
}

type Version = [major: number, minor: number, patch: number] | undefined;

function parseVersion(version: string | undefined): Version {
  const match = /^(\d+)\.(\d+)\.(\d+)/.exec(version ?? '');
  return match === null ? undefined : [Number(match[1]), Number(match[2]), Number(match[3])];
}

/** Whether a broker of this version honours x-consumer-timeout on basic.consume (3.11.15, 3.12 and later). */
export function honoursConsumerTimeout(version: string | undefined): boolean {
  const v = parseVersion(version);
  if (v === undefined) return true; // unknown: assume a current broker
  const [major, minor, patch] = v;
  if (major !== 3) return major > 3;
  return minor > 11 || (minor === 11 && patch >= 15);
}

/**
 * Whether to send x-consumer-timeout to a broker of this version for a queue of this
 * type: not where it is ignored (before 3.11.15), nor on a classic queue from 4.3, which
 * refuses it (406) because classic queues no longer time out at all.
 */
export function sendsConsumerTimeout(version: string | undefined, queueType: 'classic' | 'quorum'): boolean {
  if (!honoursConsumerTimeout(version)) return false;
  const v = parseVersion(version);
  const from43 = v !== undefined && (v[0] > 4 || (v[0] === 4 && v[1] >= 3));
  return !(from43 && queueType === 'classic');
}

/** Whether a queue.declare was refused over its x-consumer-timeout (a different value than the queue has, or none). */
export function isConsumerTimeoutArgumentClash(err: unknown): boolean {
  return (
    (err as { code?: unknown }).code === 406 && /x-consumer-timeout/.test(String((err as Error).message))
  );
}
