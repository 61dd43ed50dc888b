// Node loss under load on a real 3-node RabbitMQ 4.0 cluster (issue 15), from the kit at
// ../shared/rabbitmq-versions (`cluster start`; nodes on 127.0.0.1:5681-5683). The service
// runs as a user runs it (the CLI, every node's URL, --queue-type quorum) while nodes are
// stopped and killed one after another; the `record` fixture appends each task's id to a
// file, so what ran, what ran twice and what never ran can be counted.
//
// Skips with one line when the kit or its cluster is not there, unless CLUSTER_REQUIRED=1.
// Every node a test stops is brought back at teardown, pass or fail.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import amqp from 'amqplib';
import {
  type Broker,
  cliArgs,
  freshName,
  getJson,
  ROOT,
  readyPort,
  type SpawnedCli,
  spawnCli,
  waitFor,
} from '../support/helpers.ts';
import { publishRecords, runCounts, runsFile, tally } from '../support/load.ts';

const KIT = process.env.RABBITMQ_VERSIONS_KIT ?? join(ROOT, '..', 'shared', 'rabbitmq-versions');
const NODES = [1, 2, 3] as const;
type Node = (typeof NODES)[number];
const nodeUrl = (n: Node) => `amqp://testuser:testuser@127.0.0.1:${5680 + n}/`;
const ALL_URLS = NODES.map(nodeUrl).join(',');

const TASKS = 5_000;
/** How long each task runs (ms): long enough that the load outlasts the three faults. */
const TASK_MS = Number(process.env.CLUSTER_TASK_MS ?? 80);
const RECOVERY_LIMIT_MS = 10_000;
const DUPLICATE_LIMIT = 0.005;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command without blocking the event loop (the service's health is polled meanwhile). */
function run(file: string, args: string[], timeoutMs = 180_000): Promise<Run> {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

const cluster = (...args: string[]) => run(join(KIT, 'cluster'), args, 300_000);
const ctl = (n: Node, ...args: string[]) => run(join(KIT, 'bin', `cluster-${n}`, 'rabbitmqctl'), args);

/** Which nodes' apps are running, from `cluster status`. */
async function runningNodes(): Promise<Set<Node>> {
  const status = await cluster('status');
  const up = new Set<Node>();
  if (status.code !== 0) return up;
  for (const n of NODES)
    if (new RegExp(`^rabbitc${n}@\\S+.*running \\(app running\\)`, 'm').test(status.stdout)) up.add(n);
  return up;
}

/** Why the cluster tests cannot run here, or undefined when they can. */
async function unavailable(): Promise<string | undefined> {
  if (!existsSync(join(KIT, 'cluster'))) return `no cluster kit at ${KIT}`;
  const up = await runningNodes();
  if (up.size < 3)
    return `the kit's cluster is not running (${up.size}/3 nodes up: run ${join(KIT, 'cluster')} start)`;
  return undefined;
}

const reason = await unavailable();
const skip =
  reason !== undefined && process.env.CLUSTER_REQUIRED !== '1' ? `cluster tests skipped: ${reason}` : false;

/** Fails at once when CLUSTER_REQUIRED=1 and the cluster is not there. */
function requireCluster(): void {
  if (reason !== undefined) assert.fail(`CLUSTER_REQUIRED=1 but ${reason}`);
}

interface QueueInfo {
  name: string;
  leader?: string;
  members?: string[];
  online?: string[];
  messages?: number;
}

/** The queues as a running node sees them. */
async function listQueues(): Promise<QueueInfo[]> {
  const up = await runningNodes();
  for (const n of up) {
    const r = await ctl(
      n,
      'list_queues',
      'name',
      'leader',
      'members',
      'online',
      'messages',
      '--formatter',
      'json',
    );
    if (r.code === 0) return JSON.parse(r.stdout) as QueueInfo[];
  }
  throw new Error('no cluster node answers list_queues');
}

const nodeOf = (erlangNode: string | undefined): Node => {
  const m = /^rabbitc([123])@/.exec(erlangNode ?? '');
  if (m === null) throw new Error(`not a cluster node: ${erlangNode}`);
  return Number(m[1]) as Node;
};

async function leaderOf(queue: string): Promise<Node> {
  const info = (await listQueues()).find((q) => q.name === queue);
  return nodeOf(info?.leader);
}

/** Waits until every node runs and every quorum queue of ours has all three members online again. */
async function waitForFullCluster(queues: string[]): Promise<void> {
  await waitFor('all three nodes running', async () => (await runningNodes()).size === 3, 180_000);
  await waitFor(
    `${queues.join(', ')} with 3 members online`,
    async () => {
      const infos = await listQueues().catch(() => []);
      return queues.every((name) => infos.find((q) => q.name === name)?.online?.length === 3);
    },
    120_000,
  );
}

/** The node the service's consuming connection is on, from /health amqp.broker. */
async function connectedNode(port: number): Promise<Node> {
  const broker = await waitFor('/health to name the broker', async () => {
    const { status, body } = await getJson(port, '/health').catch(() => ({
      status: 0,
      body: {} as Record<string, unknown>,
    }));
    const amqpInfo = body.amqp as { broker?: string } | undefined;
    return status === 200 ? amqpInfo?.broker : undefined;
  });
  const m = /:(568[123])\b/.exec(broker);
  if (m === null) throw new Error(`/health names no cluster node: ${broker}`);
  assert.doesNotMatch(broker, /testuser:testuser/, '/health never shows the password');
  return (Number(m[1]) - 5680) as Node;
}

/** Lines in the runs file: every run, duplicates included. */
function totalRuns(path: string): number {
  let total = 0;
  for (const c of runCounts(path).values()) total += c;
  return total;
}

/**
 * How long after `faultAt` the services are consuming again: each replica's /health is 200,
 * and tasks are running (the runs file has grown by `progress` lines since the fault), or
 * everything has run already.
 */
async function recoveredAfter(
  ports: number[],
  path: string,
  faultAt: number,
  progress = 20,
): Promise<number> {
  const before = totalRuns(path);
  await waitFor(
    'the service to consume again',
    async () => {
      for (const port of ports) {
        const { status } = await getJson(port, '/health').catch(() => ({ status: 0 }));
        if (status !== 200) return false;
      }
      return totalRuns(path) >= before + progress || tally(path, TASKS).lost === 0;
    },
    120_000,
  );
  return performance.now() - faultAt;
}

/** Brings every node back (start_app, or `cluster start` for a stopped or killed VM). */
async function restoreCluster(): Promise<void> {
  for (const n of NODES) await ctl(n, 'start_app');
  if ((await runningNodes()).size < 3) await cluster('start');
}

/** Publishes through a connection of its own to one node, closed before any fault. */
async function publishAll(queue: string, path: string): Promise<void> {
  const connection = await amqp.connect(nodeUrl(1));
  try {
    const channel = await connection.createConfirmChannel();
    const send: Broker['send'] = (q, body, options = {}) =>
      new Promise<void>((resolve, reject) =>
        channel.sendToQueue(q, Buffer.from(JSON.stringify(body)), { persistent: true, ...options }, (err) =>
          err ? reject(err) : resolve(),
        ),
      );
    await publishRecords({ send } as Broker, queue, path, TASKS, {
      ms: TASK_MS,
      options: (i) => ({ messageId: `m${i}` }),
    });
  } finally {
    await connection.close().catch(() => {});
  }
}

/** Counts a queue's messages through any live node. */
async function messageCount(queue: string): Promise<number> {
  for (const n of NODES) {
    const connection = await amqp.connect(nodeUrl(n)).catch(() => undefined);
    if (connection === undefined) continue;
    try {
      const channel = await connection.createChannel();
      return (await channel.checkQueue(queue)).messageCount;
    } finally {
      await connection.close().catch(() => {});
    }
  }
  throw new Error('no cluster node accepts a connection');
}

interface TestContext {
  after: (fn: () => unknown) => void;
  name: string;
  diagnostic: (message: string) => void;
}

interface Replica {
  cli: SpawnedCli;
  port: number;
}

/**
 * A node-loss run: the cluster required, a fresh queue (with its `.dead`), the file its
 * tasks record their runs in, and the list its replicas go into, for the teardown.
 */
function startRun(t: TestContext): { queue: string; queues: string[]; path: string; replicas: Replica[] } {
  requireCluster();
  const queue = freshName(t);
  const replicas: Replica[] = [];
  teardown(t, queue, replicas);
  return { queue, queues: [queue, `${queue}.dead`], path: runsFile(t), replicas };
}

/**
 * At teardown, pass or fail: brings every node back, stops the test's replicas (t.after hooks
 * run in the order they were added, so spawnCli's own would come too late: a replica still
 * consuming would declare the queues again), and deletes the test's queues.
 */
function teardown(t: TestContext, queue: string, replicas: Replica[]): void {
  t.after(async () => {
    await restoreCluster();
    for (const { cli } of replicas) {
      if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGKILL');
      await cli.exit;
    }
    const connection = await amqp.connect(nodeUrl(1)).catch(() => undefined);
    const channel = await connection?.createChannel().catch(() => undefined);
    for (const q of [queue, `${queue}.dead`]) await channel?.deleteQueue(q).catch(() => {});
    await channel?.deleteExchange(`${queue}.x`).catch(() => {});
    await connection?.close().catch(() => {});
  });
}

/** Spawns one service replica on the cluster and returns it with its HTTP port once healthy. */
async function startReplica(t: TestContext, queue: string, workers: number): Promise<Replica> {
  const cli = spawnCli(
    t,
    cliArgs(queue, ['--amqp-url', ALL_URLS, '--queue-type', 'quorum', '--workers', String(workers)]),
  );
  const port = await readyPort(cli);
  await waitFor(
    'the replica to be healthy',
    async () => (await getJson(port, '/health')).status === 200,
    60_000,
  );
  return { cli, port };
}

/** A fault while nothing is left to run proves nothing: the load must outlast the faults. */
function assertUnderLoad(path: string, label: string): void {
  const left = tally(path, TASKS).lost;
  assert.ok(
    left > 0,
    `${label}: tasks are still waiting to run (else raise CLUSTER_TASK_MS, now ${TASK_MS})`,
  );
}

/**
 * Takes `node` down (`stop_app`: its app stops and closes its connections; `kill`: its VM
 * is killed with SIGKILL, no goodbye at all), measures the recovery, brings it back and
 * waits for the full cluster.
 */
async function nodeFault(
  t: TestContext,
  label: string,
  how: 'stop_app' | 'kill',
  node: Node,
  ports: number[],
  path: string,
  queues: string[],
): Promise<number> {
  assertUnderLoad(path, label);
  const issued = performance.now();
  const down = how === 'stop_app' ? await ctl(node, 'stop_app') : await cluster('kill', String(node));
  const commandMs = performance.now() - issued;
  assert.equal(down.code, 0, `${how} node ${node}: ${down.stderr}`);
  const recovery = await recoveredAfter(ports, path, issued);
  t.diagnostic(
    `${label}: ${how} node ${node} (the command took ${commandMs.toFixed(0)} ms); consuming again ` +
      `${recovery.toFixed(0)} ms after it was issued, connected to node ${await connectedNode(ports[0] as number)} ` +
      `(${TASKS - tally(path, TASKS).ran} tasks not yet run)`,
  );
  const back = how === 'stop_app' ? await ctl(node, 'start_app') : await cluster('start');
  assert.equal(back.code, 0, `bringing node ${node} back after ${how}: ${back.stderr}`);
  await waitForFullCluster(queues);
  return recovery;
}

/**
 * The end of a node-loss run: waits for every task and an empty queue, then asserts what
 * was lost (0), what ran twice (at most 0.5%), each recovery (within 10 s) and the
 * dead-letter queue (empty).
 */
async function accountFor(
  t: { diagnostic: (message: string) => void },
  label: string,
  queue: string,
  path: string,
  recoveries: number[],
  atStart: number,
): Promise<void> {
  await waitFor('every task to run', () => tally(path, TASKS).lost === 0, 900_000);
  await waitFor('the queue to be empty and settled', async () => (await messageCount(queue)) === 0, 60_000);
  const { ran, lost, duplicates } = tally(path, TASKS);
  t.diagnostic(
    `${label}${ran} of ${TASKS} ran, ${lost} lost, ${duplicates} duplicate runs ` +
      `(${((duplicates / TASKS) * 100).toFixed(2)}%), in ${((Date.now() - atStart) / 1000).toFixed(0)} s; ` +
      `recoveries ${recoveries.map((ms) => `${(ms / 1000).toFixed(1)} s`).join(', ')}`,
  );
  assert.equal(lost, 0, 'every task ran');
  assert.ok(duplicates <= TASKS * DUPLICATE_LIMIT, `duplicates ${duplicates} at most 0.5% of ${TASKS}`);
  for (const [i, ms] of recoveries.entries())
    assert.ok(ms <= RECOVERY_LIMIT_MS, `fault ${i + 1}: consuming again within 10 s (${ms.toFixed(0)} ms)`);
  assert.equal(await messageCount(`${queue}.dead`), 0, 'nothing dead-lettered');
}

test('quorum queue on 3 nodes: 5,000 tasks survive stopping the leader, the connected node, and killing a node', {
  skip,
  timeout: 1_500_000,
}, async (t) => {
  const { queue, queues, path, replicas } = startRun(t);
  replicas.push(await startReplica(t, queue, 4));
  const { port } = replicas[0] as Replica;
  await publishAll(queue, path);
  const recoveries: number[] = [];
  const atStart = Date.now();

  // 1. The node that leads the queue: its app stops (connections closed, leadership moves).
  const leader = await leaderOf(queue);
  recoveries.push(await nodeFault(t, 'fault 1 (queue leader)', 'stop_app', leader, [port], path, queues));

  // 2. The node the service is connected to.
  const connected = await connectedNode(port);
  recoveries.push(
    await nodeFault(t, 'fault 2 (connected node)', 'stop_app', connected, [port], path, queues),
  );

  // 3. A node's process killed outright (SIGKILL): the queue leader now, no goodbye at all.
  recoveries.push(
    await nodeFault(t, 'fault 3 (the queue leader)', 'kill', await leaderOf(queue), [port], path, queues),
  );

  await accountFor(t, '', queue, path, recoveries, atStart);
});

test('three replicas on a 3-node quorum queue: node faults and one replica killed with SIGKILL, nothing lost', {
  skip,
  timeout: 1_500_000,
}, async (t) => {
  const { queue, queues, path, replicas } = startRun(t);
  for (let i = 0; i < 3; i++) replicas.push(await startReplica(t, queue, 2));
  const [first, second, third] = replicas as [Replica, Replica, Replica];
  await publishAll(queue, path);
  const atStart = Date.now();
  const recoveries: number[] = [];
  const allPorts = replicas.map((r) => r.port);

  // 1. The queue leader's app stops, under all three replicas.
  recoveries.push(
    await nodeFault(t, 'fault 1 (queue leader)', 'stop_app', await leaderOf(queue), allPorts, path, queues),
  );

  // 2. A replica is killed outright mid-run: what it had taken and not acked is the others' now.
  assertUnderLoad(path, 'replica kill');
  const killedAt = performance.now();
  second.cli.child.kill('SIGKILL');
  await second.cli.exit;
  const livePorts = [first.port, third.port];
  const replicaRecovery = await recoveredAfter(livePorts, path, killedAt);
  t.diagnostic(
    `replica killed with SIGKILL: the other two running tasks ${replicaRecovery.toFixed(0)} ms later ` +
      `(${tally(path, TASKS).lost} tasks not yet run)`,
  );

  // 3. The node the first replica is connected to.
  recoveries.push(
    await nodeFault(
      t,
      'fault 2 (node of a replica)',
      'stop_app',
      await connectedNode(first.port),
      livePorts,
      path,
      queues,
    ),
  );

  // 4. The node of the third replica, killed outright.
  recoveries.push(
    await nodeFault(
      t,
      "fault 3 (a replica's node)",
      'kill',
      await connectedNode(third.port),
      livePorts,
      path,
      queues,
    ),
  );

  // A replica that acked another's redelivered work from its dedupe memory without running
  // it would show as a lost id.
  await accountFor(t, '3 replicas: ', queue, path, recoveries, atStart);
});
