// The broker objects the service needs, declared on every (re)connect: a durable direct
// exchange, the durable work queue bound to it (classic or quorum), the durable
// `<queue>.dead`, one TTL queue per retry delay, which dead-letters back to the work
// queue when the delay is over (retries with no broker plugin), and the delay queues in use
// (delay.ts) of the same kind. With quorum, all of them are quorum queues.
import type { Channel } from 'amqplib';
import { ServiceError } from '../errors.ts';
import { exponentialDelay } from '../util/backoff.ts';
import { isConsumerTimeoutArgumentClash, sendsConsumerTimeout } from './consumer-timeout.ts';
import { controlExchangeName } from './control.ts';
import { delayQueueName } from './delay.ts';

export interface Topology {
  exchange: string;
  queue: string;
  routingKey: string;
  queueType: 'classic' | 'quorum';
  /** Quorum queues only: deliveries before the broker dead-letters a message itself. */
  deliveryLimit: number;
  /** The delay before retry k (1-based), in ms; its length is the number of retries. */
  retryDelaysMs: readonly number[];
  /** Classic queues: the work queue's x-max-priority (0 or absent: none). */
  maxPriority?: number;
  /**
   * The delay queues in use (their TTLs, amqp/delay.ts): declared from the first delayed
   * message on, never before, so a service that delays nothing has no such queues (with
   * quorum queues, each is a replicated queue of its own).
   */
  delaySteps?: Set<number>;
  /**
   * The work queue's x-consumer-timeout: past the longest a delivery is held here (see
   * consumer-timeout.ts). The consumer asks for the same on basic.consume.
   */
  consumerTimeoutMs?: number;
}

/** The broker being declared on: its version, and a way to open a channel a refusal may close. */
export interface DeclaringOn {
  version: string | undefined;
  openChannel: () => Promise<Channel>;
}

/**
 * What became of the work queue's x-consumer-timeout: `declared`; `kept` (the queue was
 * declared before with another value or none, and a queue's arguments never change); or
 * `not sent` (this broker ignores it, or refuses it on a classic queue).
 */
export type ConsumerTimeoutDeclared = 'declared' | 'kept' | 'not sent';

export function deadLetterQueueName(queue: string): string {
  return `${queue}.dead`;
}

/** A TTL queue per delay: a changed delay is a new name, never a clashing redeclare. */
export function retryQueueName(queue: string, delayMs: number): string {
  return `${queue}.retry.${delayMs}ms`;
}

/** Retry k (1-based) waits base * 2^(k-1), capped, in whole ms. */
export function retryDelayMs(retry: number, baseMs: number, maxMs: number): number {
  return Math.round(exponentialDelay(retry, { initialMs: baseMs, maxMs }));
}

/** The delays of every retry up to `retries` (see retryDelayMs). */
export function retryDelays(retries: number, baseMs: number, maxMs: number): number[] {
  return Array.from({ length: retries }, (_, k) => retryDelayMs(k + 1, baseMs, maxMs));
}

function workQueueArguments(topology: Topology): Record<string, unknown> {
  if (topology.queueType === 'classic')
    // Quorum queues have the broker's own two levels (4.0 and later), and no argument.
    return topology.maxPriority !== undefined && topology.maxPriority > 0
      ? { 'x-max-priority': topology.maxPriority }
      : {};
  return {
    'x-queue-type': 'quorum',
    // Deliberate, not RabbitMQ 4's default of 20: a message that kills the master again and
    // again (so that we never settle it) ends in our dead-letter queue, with the broker's
    // x-death reason `delivery_limit`, instead of looping or being dropped.
    'x-delivery-limit': topology.deliveryLimit,
    'x-dead-letter-exchange': '',
    'x-dead-letter-routing-key': deadLetterQueueName(topology.queue),
    // at-least-once dead-lettering needs reject-publish; with it the broker keeps the message
    // until the dead-letter queue has confirmed it.
    'x-dead-letter-strategy': 'at-least-once',
    'x-overflow': 'reject-publish',
  };
}

/**
 * `<queue>.dead` is of the work queue's type: on a cluster with quorum queues, a dead-lettered
 * message must survive the loss of a node as the task did.
 */
function deadLetterQueueArguments(topology: Topology): Record<string, unknown> {
  return topology.queueType === 'quorum' ? { 'x-queue-type': 'quorum' } : {};
}

/**
 * A retry TTL queue is of the work queue's type too. A quorum one dead-letters back to the
 * work queue at-least-once (reject-publish, as for the work queue): a retry waiting out its
 * delay is never dropped on the way back, nor lost with a node.
 */
function retryQueueArguments(topology: Topology, delayMs: number): Record<string, unknown> {
  const back = {
    'x-message-ttl': delayMs,
    'x-dead-letter-exchange': '',
    'x-dead-letter-routing-key': topology.queue,
  };
  if (topology.queueType === 'classic') return back;
  return {
    ...back,
    'x-queue-type': 'quorum',
    'x-dead-letter-strategy': 'at-least-once',
    'x-overflow': 'reject-publish',
  };
}

function topologyClash(what: string, err: unknown): ServiceError {
  return new ServiceError(
    'ERR_TOPOLOGY',
    `${what} exists with other settings than this service declares (${(err as Error).message}). ` +
      'The Python tool declared a non-durable queue: delete it once (rabbitmqctl delete_queue NAME) ' +
      'or use another --queue / --exchange; a queue cannot change between classic and quorum either.',
    { cause: err },
  );
}

/** Runs a declaration; a clash with an existing object (406) is ERR_TOPOLOGY, with a hint. */
async function declaring(what: string, declare: () => Promise<unknown>): Promise<void> {
  try {
    await declare();
  } catch (err) {
    if ((err as { code?: unknown }).code === 406) throw topologyClash(what, err);
    throw err;
  }
}

/**
 * The work queue with its x-consumer-timeout, on channels of their own: a queue declared
 * before with another value (a changed --worker-timeout) or with none refuses it on RabbitMQ
 * 4.3 with a 406 that closes the channel. Then the queue is declared as it is, without the
 * argument (a queue's arguments never change); where even that clashes (4.3 compares the
 * argument both ways), the queue exists with its own value, and the consumer's argument
 * on basic.consume, which beats the queue's, still applies.
 */
async function declareWorkQueue(
  channel: Channel,
  topology: Topology,
  on: DeclaringOn | undefined,
): Promise<ConsumerTimeoutDeclared> {
  const { queue, consumerTimeoutMs } = topology;
  const what = `queue ${JSON.stringify(queue)}`;
  const args = workQueueArguments(topology);
  if (
    on === undefined ||
    consumerTimeoutMs === undefined ||
    !sendsConsumerTimeout(on.version, topology.queueType)
  ) {
    await declaring(what, () => channel.assertQueue(queue, { durable: true, arguments: args }));
    return 'not sent';
  }
  /** True when declared; false when refused over x-consumer-timeout alone, with the value the queue has. */
  const attempt = async (args: Record<string, unknown>): Promise<{ ok: boolean; current?: string }> => {
    const scratch = await on.openChannel();
    scratch.on('error', () => {});
    try {
      await scratch.assertQueue(queue, { durable: true, arguments: args });
      return { ok: true };
    } catch (err) {
      if (isConsumerTimeoutArgumentClash(err)) return { ok: false, current: currentValueIn(err) };
      if ((err as { code?: unknown }).code === 406) throw topologyClash(what, err);
      throw err;
    } finally {
      // A refused declare has closed it already; any other ending leaves it to close here.
      await scratch.close().catch(() => {});
    }
  };
  const first = await attempt({ ...args, 'x-consumer-timeout': consumerTimeoutMs });
  if (first.ok) return 'declared';
  // Declared again with the value the queue has (or without one), so that a clash in any
  // other argument is still found and reported.
  const kept = Number(first.current);
  const again = Number.isSafeInteger(kept) ? { ...args, 'x-consumer-timeout': kept } : args;
  const second = await attempt(again);
  if (!second.ok) await declaring(what, () => channel.checkQueue(queue));
  return 'kept';
}

/** The value RabbitMQ says the queue has, in its "inequivalent arg" refusal ("current is the value '600000'"). */
function currentValueIn(err: unknown): string | undefined {
  return /current is the value '([^']*)'/.exec(String((err as Error).message))?.[1];
}

/**
 * Declares the topology. A clash with an existing queue or exchange is ERR_TOPOLOGY, with a
 * hint. Without `on` (a tool declaring as the service does), no consumer timeout is sent.
 */
export async function declareTopology(
  channel: Channel,
  topology: Topology,
  on?: DeclaringOn,
): Promise<ConsumerTimeoutDeclared> {
  const { exchange, queue, routingKey } = topology;
  await declaring(`exchange ${JSON.stringify(exchange)}`, () =>
    channel.assertExchange(exchange, 'direct', { durable: true }),
  );
  const consumerTimeout = await declareWorkQueue(channel, topology, on);
  await declaring(`queue ${JSON.stringify(deadLetterQueueName(queue))}`, () =>
    channel.assertQueue(deadLetterQueueName(queue), {
      durable: true,
      arguments: deadLetterQueueArguments(topology),
    }),
  );
  for (const delayMs of new Set(topology.retryDelaysMs)) {
    const name = retryQueueName(queue, delayMs);
    await declaring(`queue ${JSON.stringify(name)}`, () =>
      channel.assertQueue(name, { durable: true, arguments: retryQueueArguments(topology, delayMs) }),
    );
  }
  for (const stepMs of [...(topology.delaySteps ?? [])].sort((a, b) => a - b)) {
    const name = delayQueueName(queue, stepMs);
    await declaring(`queue ${JSON.stringify(name)}`, () =>
      channel.assertQueue(name, { durable: true, arguments: retryQueueArguments(topology, stepMs) }),
    );
  }
  await declaring(`exchange ${JSON.stringify(controlExchangeName(queue))}`, () =>
    channel.assertExchange(controlExchangeName(queue), 'fanout', { durable: true }),
  );
  await channel.bindQueue(queue, exchange, routingKey);
  return consumerTimeout;
}
