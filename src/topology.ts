// The broker objects the service needs, declared on every (re)connect: a durable direct
// exchange, the durable work queue bound to it, and the durable `<queue>.dead`.
import type { Channel } from 'amqplib';
import { ServiceError } from './errors.ts';

export interface Topology {
  exchange: string;
  queue: string;
  routingKey: string;
}

export function deadLetterQueueName(queue: string): string {
  return `${queue}.dead`;
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
            'or use another --queue / --exchange.',
          { cause: err },
        );
      }
      throw err;
    }
  };
  await step(`exchange ${JSON.stringify(exchange)}`, () =>
    channel.assertExchange(exchange, 'direct', { durable: true }),
  );
  await step(`queue ${JSON.stringify(queue)}`, () => channel.assertQueue(queue, { durable: true }));
  await step(`queue ${JSON.stringify(deadLetterQueueName(queue))}`, () =>
    channel.assertQueue(deadLetterQueueName(queue), { durable: true }),
  );
  await channel.bindQueue(queue, exchange, routingKey);
}
