// The whole-system figure (issue 15): the service on a 3-node RabbitMQ cluster, quorum
// queue, 2 replicas × 2 workers, against a raw amqplib consumer on the same cluster
// queue; the same with one node stopped; and what a quorum queue costs against a classic
// one on that cluster. Run by `npm run bench` when the kit's cluster answers
// (../shared/rabbitmq-versions/cluster start), or alone: `node bench/cluster.ts`.
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import amqp, { type ChannelModel, type ConfirmChannel } from 'amqplib';
import { declareTopology } from '../src/amqp/topology.ts';
import { deleteServiceExchanges, rateUntil, startServiceProcess } from './service-process.ts';

const KIT = fileURLToPath(new URL('../../shared/rabbitmq-versions', import.meta.url));
const NODES = [5681, 5682, 5683].map((port) => `amqp://testuser:testuser@127.0.0.1:${port}/`);
const N = process.argv.includes('--quick') ? 5_000 : 20_000;
const WARM_UP = N / 4;
const noop = Buffer.from('{"func":"noop"}');
const run = promisify(execFile);

export interface ClusterFigures {
  rawQuorum: number;
  rawClassic: number;
  service: number;
  rawQuorumNodeDown: number;
  serviceNodeDown: number;
}

/** The cluster's first node, or undefined when the kit's cluster does not answer. */
export async function clusterConnection(): Promise<ChannelModel | undefined> {
  try {
    return await amqp.connect(NODES[0] as string, { timeout: 2_000 });
  } catch {
    return undefined;
  }
}

async function fill(channel: ConfirmChannel, queue: string, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    if (!channel.sendToQueue(queue, noop, { persistent: true })) await once(channel, 'drain');
    if (i % 2000 === 1999) await channel.waitForConfirms();
  }
  await channel.waitForConfirms();
}

/** Declared as the service declares it (quorum: its delivery limit and dead-lettering), so that it takes it as is. */
async function declare(channel: ConfirmChannel, queue: string, type: 'quorum' | 'classic'): Promise<void> {
  await declareTopology(channel, {
    exchange: `${queue}.x`,
    queue,
    routingKey: 'curio_amqp',
    queueType: type,
    deliveryLimit: 10,
    retryDelaysMs: [],
  });
}

/**
 * A raw amqplib consumer (prefetch 1000, ack each) draining `n` from `queue`: tasks/s
 * after the first `warmUp` (the ceiling of every ratio, here and in bench.ts).
 */
export async function rawRate(
  connection: ChannelModel,
  queue: string,
  n: number,
  warmUp: number,
): Promise<number> {
  const consumer = await connection.createChannel();
  await consumer.prefetch(1000);
  let got = 0;
  let start = 0;
  await new Promise<void>((resolve) => {
    void consumer.consume(queue, (m) => {
      if (m === null) return;
      consumer.ack(m);
      if (++got === warmUp) start = performance.now();
      if (got === n) resolve();
    });
  });
  const rate = (n - warmUp) / ((performance.now() - start) / 1000);
  await consumer.close();
  return rate;
}

const raw = (connection: ChannelModel, queue: string) => rawRate(connection, queue, N, WARM_UP);

/** `replicas` service processes with `workers` each on `queue` (quorum), all three nodes given: tasks/s. */
async function service(queue: string, replicas: number, workers: number): Promise<number> {
  // Started together, so that the warm-up covers every replica's start.
  const started = await Promise.all(
    Array.from({ length: replicas }, () =>
      startServiceProcess({ amqpUrl: NODES.join(','), queue, workers, extra: ['--queue-type', 'quorum'] }),
    ),
  );
  try {
    const total = async () => (await Promise.all(started.map((s) => s.total()))).reduce((a, b) => a + b, 0);
    return await rateUntil(total, N, WARM_UP, 50);
  } finally {
    await Promise.all(started.map((s) => s.stop()));
  }
}

async function ctl(node: number, ...args: string[]): Promise<void> {
  await run(`${KIT}/bin/cluster-${node}/rabbitmqctl`, args, { timeout: 120_000 });
}

export async function clusterPhase(log: (msg: string) => void): Promise<ClusterFigures> {
  const connection = (await clusterConnection()) as ChannelModel;
  const channel = await connection.createConfirmChannel();
  const made: string[] = [];
  const fresh = async (type: 'quorum' | 'classic') => {
    const q = `bench.cluster.${type}.${randomUUID().slice(0, 8)}`;
    await declare(channel, q, type);
    made.push(q, `${q}.dead`);
    await fill(channel, q, N);
    return q;
  };
  try {
    log('cluster: raw consumer, quorum and classic queues...');
    const rawQuorum = await raw(connection, await fresh('quorum'));
    const rawClassic = await raw(connection, await fresh('classic'));
    log('cluster: the service, 2 replicas × 2 workers, quorum queue...');
    const serviceRate = await service(await fresh('quorum'), 2, 2);
    log('cluster: the same with node 3 stopped...');
    await ctl(3, 'stop_app');
    try {
      const rawQuorumNodeDown = await raw(connection, await fresh('quorum'));
      const serviceNodeDown = await service(await fresh('quorum'), 2, 2);
      return { rawQuorum, rawClassic, service: serviceRate, rawQuorumNodeDown, serviceNodeDown };
    } finally {
      await ctl(3, 'start_app');
      await ctl(3, 'await_startup');
    }
  } finally {
    for (const q of made) {
      await channel.deleteQueue(q).catch(() => {});
      await deleteServiceExchanges(channel, q);
    }
    await connection.close().catch(() => {});
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const probe = await clusterConnection();
  if (probe === undefined) {
    process.stderr.write('no cluster: start it with ../shared/rabbitmq-versions/cluster start\n');
    process.exit(2);
  }
  await probe.close();
  process.stdout.write(
    `${JSON.stringify(await clusterPhase((m) => process.stderr.write(`${m}\n`)), null, 2)}\n`,
  );
}
