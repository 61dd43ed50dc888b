// RabbitMQ's delivery-acknowledgement timeout (consumer_timeout, 30 min by default): a
// delivery held unacked longer than it makes the broker close the channel (up to 4.2),
// or cancel the consumer (4.3, quorum queues), and the message comes back while it still
// runs here: it runs again beside itself, in a loop, or ends both succeeded and
// dead-lettered by a quorum queue's delivery limit. The service owns the deadline of each
// task (--worker-timeout), so the broker's must never fire first: from 3.12 (and 3.11.15)
// a consumer can set its own with the `x-consumer-timeout` argument of basic.consume,
// which beats the queue's and the broker's. Older brokers ignore it, and 4.3.2 and
// later refuse it on a classic queue: there, say what the broker's setting must be.

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

/**
 * The x-consumer-timeout to ask for, past the longest hold; undefined when the broker's
 * default is enough (then nothing is asked: 4.3.2 and later refuse the argument on a
 * classic queue, which costs a reconnect).
 */
export function consumerTimeoutFor(limits: HoldLimits): number | undefined {
  const needed = longestHoldMs(limits) + SLACK_MS;
  return needed <= BROKER_DEFAULT_CONSUMER_TIMEOUT_MS ? undefined : Math.min(MAX_TIMEOUT_MS, needed);
}

/** Whether a broker of this version honours x-consumer-timeout on basic.consume (3.11.15, 3.12 and later). */
export function honoursConsumerTimeout(version: string | undefined): boolean {
  const match = /^(\d+)\.(\d+)\.(\d+)/.exec(version ?? '');
  if (match === null) return true; // unknown: assume a current broker
  const [major, minor, patch] = [Number(match[1]), Number(match[2]), Number(match[3])];
  if (major !== 3) return major > 3;
  return minor > 11 || (minor === 11 && patch >= 15);
}
