// Faults made on the real broker and the real processes, mid-load. Each test publishes
// with confirms and accounts for every message: ran (replied), dead-lettered or still
// queued; none lost; duplicates counted and reported.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { closeConnections, faultsUnavailable, startBroker, stopBroker } from '../support/broker-faults.ts';
import {
  AMQP_URL,
  type Broker,
  broker,
  cliArgs,
  deleteExchangesAfter,
  freshName,
  gate,
  getJson,
  readyPort,
  spawnCli,
  startService,
  testConfig,
  waitFor,
} from '../support/helpers.ts';
import { runCounts, runsFile } from '../support/load.ts';

const skip = await faultsUnavailable(AMQP_URL);

/**
 * Publishes `n` record tasks with ids `m0..m{n-1}`, each replying to `replyTo`. With a
 * `gate`, those from `m{gatedFrom}` on wait at it before they record.
 */
async function publishLoad(
  b: Broker,
  queue: string,
  path: string,
  n: number,
  replyTo: string,
  ms = 5,
  gated?: { gate: string; from: number },
) {
  for (let i = 0; i < n; i++) {
    await b.send(
      queue,
      gated !== undefined && i >= gated.from
        ? { func: 'recordAtGate', args: [path, `m${i}`, gated.gate] }
        : { func: 'record', args: [path, `m${i}`, ms] },
      { messageId: `m${i}`, replyTo, correlationId: `m${i}` },
    );
  }
}

/** Waits until every id has a reply; returns the ids that were replied to more than once. */
async function everyIdReplied(b: Broker, replyQueue: string, n: number, timeoutMs = 60_000) {
  const replied = new Map<string, number>();
  await waitFor(
    `replies to all ${n} messages`,
    async () => {
      for (const m of await b.drainQueue(replyQueue)) {
        const id = String(m.properties.correlationId);
        assert.deepEqual(JSON.parse(String(m.content)), { ok: true, result: id });
        replied.set(id, (replied.get(id) ?? 0) + 1);
      }
      return replied.size === n;
    },
    timeoutMs,
  );
  return replied;
}

function report(t: { diagnostic: (msg: string) => void }, runs: Map<string, number>, n: number) {
  const duplicates = [...runs.values()].reduce((sum, c) => sum + c - 1, 0);
  t.diagnostic(`${n} messages, ${runs.size} ran, ${duplicates} duplicate runs`);
  return duplicates;
}

test('two forced closes under load lose nothing; the service reconnects without a restart', {
  skip,
}, async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 2, prefetch: 20 }));
  const q = service.config.queue;
  const path = runsFile(t);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const n = 300;
  const publishing = publishLoad(b, q, path, n, replies.queue);
  const pidTag = `(pid ${process.pid})`;
  for (let round = 1; round <= 2; round++) {
    await waitFor('some progress', () => runCounts(path).size >= (n / 3) * round);
    assert.ok((await closeConnections(pidTag)) >= 1, 'closed our connections');
    await waitFor('a reconnect', () => service.health().status !== 'ok', 5_000).catch(() => {});
    await waitFor('healthy again', () => service.health().status === 'ok', 10_000);
  }
  await publishing;
  await everyIdReplied(b, replies.queue, n);
  const runs = runCounts(path);
  assert.equal(runs.size, n, 'every message ran');
  const duplicates = report(t, runs, n);
  assert.ok(duplicates <= 2 * 20, `duplicates bounded by what was in flight (${duplicates})`);
  assert.equal(await b.count(q), 0);
  assert.equal(await b.count(`${q}.dead`), 0);
  const metrics = await service.metrics.registry.metrics();
  assert.match(metrics, /^amqp_concurrency_amqp_reconnects_total 2$/m);
  assert.match(metrics, /^amqp_concurrency_amqp_connected 1$/m);
});

test('a busy worker killed from outside loses nothing: the task is retried and the pool refills', {
  skip,
}, async (t) => {
  const b = await broker(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { workers: 2, maxRetries: 1, retryDelay: 0.05, shutdownTimeout: 0.5 }),
  );
  const q = service.config.queue;
  b.cleanup(`${q}.retry.50ms`);
  const path = runsFile(t);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(
    q,
    { func: 'record', args: [path, 'victim', 60_000] },
    { messageId: 'victim', replyTo: replies.queue },
  );
  await waitFor('the task to start', () => runCounts(path).get('victim') === 1);
  const children = (await import('node:child_process'))
    .execFileSync('ps', ['-o', 'pid=', '--ppid', String(process.pid)], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map(Number);
  // Kill the busy one: the one whose /proc cmdline is a worker and which is busy. Kill all
  // workers: the idle one's death must not disturb anything either.
  let killed = 0;
  for (const pid of children) {
    const cmd = existsSync(`/proc/${pid}/cmdline`) ? readFileSync(`/proc/${pid}/cmdline`, 'utf8') : '';
    if (cmd.includes('worker/entry.ts')) {
      process.kill(pid, 'SIGKILL');
      killed++;
    }
  }
  assert.equal(killed, 2);
  await waitFor('the retry to start', () => runCounts(path).get('victim') === 2);
  await waitFor('the pool to refill', () => service.health().workers.up === 2);
  assert.equal(await b.count(`${q}.dead`), 0);
  const metrics = await service.metrics.registry.metrics();
  assert.match(metrics, /^amqp_concurrency_worker_restarts_total\{reason="crash"\} 2$/m);
  assert.match(metrics, /^amqp_concurrency_tasks_total\{func="record",outcome="crashed"\} 1$/m);
});

test('a master killed with SIGKILL loses nothing: a new one runs what was not acked', { skip }, async (t) => {
  const b = await broker(t);
  const queue = freshName(t);
  b.cleanup(queue, `${queue}.dead`);
  deleteExchangesAfter(t, `${queue}.x`);
  const path = runsFile(t);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const n = 200;
  // The first 50 run; the rest wait at a gate, so the kill always finds 150 unfinished
  // (two of them running, the others in the window or the queue), however slow the machine.
  const later = gate(t);
  const first = spawnCli(t, cliArgs(queue, ['--workers', '2', '--prefetch', '50']));
  const port = await readyPort(first);
  await waitFor('the queue to exist', async () => (await getJson(port, '/health')).status === 200);
  await publishLoad(b, queue, path, n, replies.queue, 10, { gate: later.path, from: 50 });
  await waitFor('the first 50 run', () => runCounts(path).size === 50);
  const workers = (await import('node:child_process'))
    .execFileSync('ps', ['-o', 'pid=', '--ppid', String(first.child.pid)], { encoding: 'utf8' })
    .trim()
    .split(/\s+/)
    .map(Number)
    .filter((pid) => pid > 0);
  assert.ok(workers.length >= 2, `the master's workers: ${workers}`);
  first.child.kill('SIGKILL');
  await first.exit;
  // Its workers die with it (their watchdog sees the master gone): only then the gate
  // opens, so that what they held can run only in the new master.
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  await waitFor("the killed master's workers gone", () => !workers.some(alive));
  assert.equal(runCounts(path).size, 50, 'none of the gated tasks ran before the kill');
  later.open();
  const second = spawnCli(t, cliArgs(queue, ['--workers', '2']));
  await readyPort(second);
  await everyIdReplied(b, replies.queue, n);
  const runs = runCounts(path);
  assert.equal(runs.size, n);
  report(t, runs, n);
  assert.equal(await b.count(queue), 0);
  second.child.kill('SIGTERM');
  assert.equal((await second.exit).code, 0);
});

test('two forced closes and a broker restart under load lose nothing; healthy again within seconds of its return', {
  skip,
}, async (t) => {
  const b0 = await broker(t);
  const service = await startService(t, b0, testConfig(t, { workers: 2, prefetch: 20 }));
  const q = service.config.queue;
  const path = runsFile(t);
  const n = 200;
  // The test's own connection dies with the broker too: publish, restart, then read on a new one.
  const replies = `${q}.replies`;
  await b0.channel.assertQueue(replies, { durable: true });
  b0.cleanup(replies);
  await publishLoad(b0, q, path, n, replies, 10);
  // The whole scenario: two forced closes first, then the restart.
  for (let round = 1; round <= 2; round++) {
    await waitFor('some progress', () => runCounts(path).size >= 20 * round);
    assert.ok((await closeConnections(`(pid ${process.pid})`)) >= 1);
    await waitFor('healthy again', () => service.health().status === 'ok', 10_000);
  }
  await waitFor('some progress', () => runCounts(path).size >= 60);
  let restarted = false;
  // Teardown brings the broker back and waits for it, even when the test fails.
  t.after(async () => {
    if (!restarted) await startBroker();
  });
  await stopBroker();
  await waitFor(
    '/health to say the broker is gone',
    () => service.health().status === 'reconnecting',
    10_000,
  );
  await startBroker();
  restarted = true;
  const back = performance.now();
  await waitFor('healthy again', () => service.health().status === 'ok', 30_000);
  t.diagnostic(`healthy ${Math.round(performance.now() - back)} ms after the broker's return`);
  const b = await broker(t);
  b.cleanup(q, `${q}.dead`, replies);
  await everyIdReplied(b, replies, n);
  const runs = runCounts(path);
  assert.equal(runs.size, n);
  report(t, runs, n);
  assert.equal(await b.count(q), 0);
  assert.equal(await b.count(`${q}.dead`), 0);
});

test('started while the broker is down, it stays up with /health 503 and connects when the broker returns', {
  skip,
}, async (t) => {
  const queue = freshName(t);
  let restarted = false;
  // Teardown brings the broker back and waits for it, even when the test fails.
  t.after(async () => {
    if (!restarted) await startBroker();
  });
  await stopBroker();
  const cli = spawnCli(t, cliArgs(queue));
  const port = await readyPort(cli);
  const down = await getJson(port, '/health');
  assert.equal(down.status, 503);
  assert.equal(down.body.status, 'connecting');
  const ready = await fetch(`http://127.0.0.1:${port}/health/live`);
  assert.equal(ready.status, 200, 'alive all the same');
  await startBroker();
  restarted = true;
  await waitFor('healthy', async () => (await getJson(port, '/health')).status === 200, 30_000);
  const b = await broker(t);
  b.cleanup(queue, `${queue}.dead`);
  deleteExchangesAfter(t, `${queue}.x`);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(queue, { func: 'add', args: [2, 2] }, { replyTo: replies.queue });
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 4 });
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
});
