// The broker objects the service needs, declared on every (re)connect: a durable direct
// exchange, the durable work queue bound to it (classic or quorum), the durable
// `<queue>.dead`, and one TTL queue per retry delay, which dead-letters back to the work
// queue when the delay is over (retries with no broker plugin). With quorum, all of them
// are quorum queues.
import type { Channel } from 'amqplib';
import { ServiceError } from './errors.ts';

export interface Topology {
  exchange: string;
  queue: string;
  routingKey: string;
  queueType: 'classic' | 'quorum';
  /** Quorum queues only: deliveries before the broker dead-letters a message itself. */
  deliveryLimit: number;
  /** The delay before retry k (1-based), in ms; its length is the number of retries. */
  retryDelaysMs: readonly number[];
}

export function deadLetterQueueName(queue: string): string {
  return `${queue}.dead`;
}

/** A TTL queue per delay: a changed delay is a new name, never a clashing redeclare. */
export function retryQueueName(queue: string, delayMs: number): string {
  return `${queue}.retry.${delayMs}ms`;
}

/** Retry k waits base * 2^(k-1), capped: the delays of every retry up to `retries`. */
export function retryDelays(retries: number, baseMs: number, maxMs: number): number[] {
  return Array.from({ length: retries }, (_, k) => Math.round(Math.min(maxMs, baseMs * 2 ** k)));
}

function workQueueArguments(topology: Topology): Record<string, unknown> {
  if (topology.queueType === 'classic') return {};
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

/** Declares the topology. A clash with an existing queue or exchange is ERR_TOPOLOGY, with a hint. */
export async function declareTopology(channel: Channel, topology: Topology): Promise<void> {
  const { exchange, queue, routingKey } = topology;
  const step = async (what: string, declare: () => Promise<unknown>) => {
    try {
      await declare();
    } catch (err) {
      if ((err as { code?: unknown }).code === 406) {
        throw new ServiceError(
          'ERR_TOPOLOGY',
          `${what} exists with other settings than this service declares (${(err as Error).message}). ` +
            'The Python tool declared a non-durable queue: delete it once (rabbitmqctl delete_queue NAME) ' +
            'or use another --queue / --exchange; a queue cannot change between classic and quorum either.',
          { cause: err },
        );
      }
      throw err;
    }
  };
  await step(`exchange ${JSON.stringify(exchange)}`, () =>
    channel.assertExchange(exchange, 'direct', { durable: true }),
  );
  await step(`queue ${JSON.stringify(queue)}`, () =>
    channel.assertQueue(queue, { durable: true, arguments: workQueueArguments(topology) }),
  );
  await step(`queue ${JSON.stringify(deadLetterQueueName(queue))}`, () =>
    channel.assertQueue(deadLetterQueueName(queue), {
      durable: true,
      arguments: deadLetterQueueArguments(topology),
    }),
  );
  for (const delayMs of new Set(topology.retryDelaysMs)) {
    const name = retryQueueName(queue, delayMs);
    await step(`queue ${JSON.stringify(name)}`, () =>
      channel.assertQueue(name, { durable: true, arguments: retryQueueArguments(topology, delayMs) }),
    );
  }
  await channel.bindQueue(queue, exchange, routingKey);
}
