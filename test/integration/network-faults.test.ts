// What the network does to a queue worker, made on purpose: the service reaches the real
// broker through a fault-injecting proxy (test/fault-proxy.ts) that partitions, resets and
// cuts mid-frame. Each test counts what was lost (0), what ran twice, and how long
// recovery took. Heartbeats of 1 s and a connect timeout of 2 s keep them short; the
// production defaults (10 s each) behave the same, only slower.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { Service } from '../../src/service/service.ts';
import { resolveTaskModule } from '../../src/worker/task-module.ts';
import { closeConnections, faultsUnavailable, unackedCount } from '../support/broker-faults.ts';
import { proxyFor } from '../support/fault-proxy.ts';
import {
  AMQP_URL,
  broker,
  gate,
  ROOT,
  seriesValue,
  startService,
  testConfig,
  waitFor,
} from '../support/helpers.ts';
import { publishRecords, runCounts, runsFile, tally } from '../support/load.ts';

const faultsOk = (await faultsUnavailable(AMQP_URL)) === undefined;

/** The broker URL through `proxy`, with a heartbeat short enough for a test. */
function through(proxy: { url: (u: string) => string }, heartbeat = 1): string {
  const url = new URL(proxy.url(AMQP_URL));
  url.searchParams.set('heartbeat', String(heartbeat));
  return url.toString();
}

test('a partition: noticed by the heartbeat, every reconnect ends at its deadline, consuming again soon after it heals; nothing lost', async (t) => {
  const b = await broker(t);
  const proxy = await proxyFor(t, AMQP_URL);
  const path = runsFile(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { amqpUrl: through(proxy), connectTimeout: 2, workers: 2, prefetch: 10 }),
  );
  const q = service.config.queue;
  await publishRecords(b, q, path, 50, { options: (i) => ({ messageId: `m${i}` }) });
  await waitFor('the first 50 to run', () => tally(path, 50).lost === 0);
  // Settled and their acks written: an ack swallowed by the partition would make its
  // message run again when it comes back (the ack window, which this test does not count).
  await waitFor(
    'every ack written',
    () => service.dispatcher.inFlight === 0 && service.consumer.unsentAcks === 0,
  );
  // ...and through the proxy to the broker (it runs in this process, a turn or two
  // behind): the broker's own count where rabbitmqctl reaches it, else a quiet link (no
  // byte forwarded either way for a while; heartbeats are a second apart).
  if (faultsOk) await waitFor('every ack at the broker', async () => (await unackedCount(q)) === 0);
  else await waitFor('a quiet link', () => proxy.quietForMs > 200);

  proxy.blackhole();
  const cutAt = performance.now();
  await waitFor('the heartbeat to notice', () => service.health().status === 'reconnecting', 15_000);
  t.diagnostic(`noticed after ${Math.round(performance.now() - cutAt)} ms`);
  // Work arrives while the service is cut off (straight to the broker, not through the proxy).
  await publishRecords(b, q, path, 100, { from: 50, options: (i) => ({ messageId: `m${i}` }) });
  // Longer than several connect deadlines: each attempt must end and the next begin. Before
  // the deadlines, the first attempt hung here for good.
  await new Promise((r) => setTimeout(r, 6_000));
  assert.equal(service.health().status, 'reconnecting');

  proxy.heal();
  const healedAt = performance.now();
  await waitFor('consuming again', () => service.health().status === 'ok', 30_000);
  const recoveryMs = performance.now() - healedAt;
  await waitFor('all 150 to run', () => tally(path, 150).lost === 0, 30_000);
  const { duplicates } = tally(path, 150);
  t.diagnostic(
    `consuming again ${Math.round(recoveryMs)} ms after the network healed; ${duplicates} duplicate runs`,
  );
  assert.ok(recoveryMs < 30_000);
  assert.ok(((await seriesValue(service, 'amqp_concurrency_amqp_reconnects_total')) ?? 0) >= 1);
  // Nothing ran while cut off, and all that was held was the broker's again: no run twice.
  assert.ok(duplicates <= 2, `${duplicates} duplicates`);
});

test('one of two broker addresses goes silent: the service moves on to the other, without waiting for it to heal; nothing lost', async (t) => {
  // A cluster node cut off from this client only (its peers still see it, so it keeps its
  // queues): the connection to it goes quiet, and a reconnect to it again would hang too.
  // Two proxies to the one broker stand in for two nodes.
  const b = await broker(t);
  const proxies = [await proxyFor(t, AMQP_URL), await proxyFor(t, AMQP_URL)];
  const path = runsFile(t);
  const amqpUrl = proxies.map((p) => through(p)).join(',');
  const service = await startService(
    t,
    b,
    testConfig(t, { amqpUrl, connectTimeout: 2, workers: 2, prefetch: 10 }),
  );
  const q = service.config.queue;
  const on = () => proxies.find((p) => service.consumer.broker?.includes(`:${p.port}/`));
  await publishRecords(b, q, path, 50, { options: (i) => ({ messageId: `m${i}` }) });
  await waitFor('the first 50 to run', () => tally(path, 50).lost === 0);
  await waitFor(
    'every ack written',
    () => service.dispatcher.inFlight === 0 && service.consumer.unsentAcks === 0,
  );
  const silent = on();
  assert.ok(silent, `the consumer is on one of the proxies (${service.consumer.broker})`);
  if (faultsOk) await waitFor('every ack at the broker', async () => (await unackedCount(q)) === 0);
  else await waitFor('a quiet link', () => silent.quietForMs > 200);

  // The states the consumer goes through, not /health polled: the reconnect to the other
  // address can be over between two polls.
  const states: string[] = [];
  service.consumer.on('state', (state) => states.push(state));
  silent.blackhole();
  const cutAt = performance.now();
  await waitFor('the heartbeat to notice', () => states.includes('reconnecting'), 15_000);
  await publishRecords(b, q, path, 100, { from: 50, options: (i) => ({ messageId: `m${i}` }) });
  await waitFor('consuming again', () => service.health().status === 'ok', 30_000);
  const recoveryMs = performance.now() - cutAt;
  assert.notEqual(on(), silent, 'consuming through the other address, the silent one still cut off');
  await waitFor('all 150 to run', () => tally(path, 150).lost === 0, 30_000);
  const { duplicates } = tally(path, 150);
  t.diagnostic(
    `consuming through the other address ${Math.round(recoveryMs)} ms after the cut; ${duplicates} duplicate runs`,
  );
  // The heartbeat window (two missed 1 s heartbeats) and at most one connect deadline (2 s)
  // for a reconnect that tried the silent address first; the silent one never healed.
  assert.ok(recoveryMs < 15_000, `recovered after ${Math.round(recoveryMs)} ms`);
  assert.ok(duplicates <= 2, `${duplicates} duplicates`);
});

test('a drain while the broker is slow to answer starts nothing more: what had not started goes back, a cancel meanwhile ends cancelled', async (t) => {
  const b = await broker(t);
  const proxy = await proxyFor(t, AMQP_URL);
  const path = runsFile(t);
  const running = gate(t);
  // A heartbeat far past the slowness below: the drain, not a lost connection, is tested.
  const config = testConfig(t, { amqpUrl: through(proxy, 20), workers: 1, prefetch: 10 });
  const service = await startService(t, b, config);
  const q = service.config.queue;
  await b.send(q, { func: 'waitAtGate', args: [running.path] }, { messageId: 'running' });
  for (let i = 0; i < 5; i++)
    await b.send(q, { func: 'record', args: [path, `waiting-${i}`] }, { messageId: `waiting-${i}` });
  await waitFor('one running, five waiting', () => {
    const h = service.health();
    return h.workers.busy === 1 && h.tasksInFlight === 6;
  });
  // The broker slow to answer (every byte held 400 ms each way, none lost): the consumer's
  // cancel waits for its reply. Meanwhile the running task ends; before, the five then
  // started one by one.
  proxy.latency(400);
  const drained = service.drain('test');
  // An operator's cancel during the drain, of the task the worker still holds next: it
  // ends cancelled (dead-lettered as such), not given back to run elsewhere later.
  assert.equal(service.cancel('waiting-0'), 'queued');
  // The task it held next came back to the master (a task that ends just as the drain
  // begins may still start the next: the gate opens only after the drain has asked).
  await waitFor('the worker to hold only its running task', () => service.pool.status()[0]?.held === 1);
  running.open();
  await waitFor('the running task to end', () => service.pool.stats().busy === 0);
  proxy.heal();
  assert.equal((await drained).code, 0);
  assert.deepEqual([...runCounts(path).keys()], [], 'none of the five ran');
  const back = await b.take(q, 4);
  assert.deepEqual(
    back.map((m) => m.properties.messageId).sort(),
    [1, 2, 3, 4].map((i) => `waiting-${i}`),
  );
  const [cancelled] = await b.take(`${q}.dead`, 1);
  assert.deepEqual(
    [cancelled?.properties.messageId, cancelled?.properties.headers?.['x-error-kind']],
    ['waiting-0', 'cancelled'],
  );
});

test('a drain while a connect hangs ends within the shutdown timeout', async (t) => {
  const b = await broker(t);
  const proxy = await proxyFor(t, AMQP_URL);
  proxy.blackhole();
  // A connect timeout far past the shutdown timeout: the drain must not wait for it.
  const config = testConfig(t, { amqpUrl: through(proxy), connectTimeout: 60, shutdownTimeout: 2 });
  b.cleanup(config.queue, `${config.queue}.dead`);
  const service = new Service({
    config,
    moduleUrl: resolveTaskModule(config.taskPath, ROOT),
    logger: pino({ level: config.logLevel }),
  });
  t.after(() => service.drain('teardown'));
  await service.start();
  await waitFor('a connect that hangs', () => proxy.connections > 0);
  assert.equal(service.health().status, 'connecting');
  const start = performance.now();
  const ending = await service.drain('test');
  const tookMs = performance.now() - start;
  t.diagnostic(`drained in ${Math.round(tookMs)} ms`);
  assert.equal(ending.code, 0);
  // Within the 2 s shutdown timeout, not the 60 s connect timeout: the bound is far from
  // both, so a busy machine does not fail it and a drain that waited for the connect does.
  assert.ok(tookMs < 30_000, `the drain took ${tookMs} ms`);
});

test('channel losses under load: what a dead channel delivered and had not started is dropped, not run twice', async (t) => {
  const b = await broker(t);
  const proxy = await proxyFor(t, AMQP_URL);
  const path = runsFile(t);
  // The automatic prefetch: with 2 ms tasks the service holds hundreds of deliveries.
  const service = await startService(
    t,
    b,
    testConfig(t, { amqpUrl: through(proxy, 5), connectTimeout: 5, workers: 2, prefetch: undefined }),
  );
  const q = service.config.queue;
  const n = 3_000;
  // No message ids: nothing for the dedupe memory to go on.
  await publishRecords(b, q, path, n, { ms: 2 });
  const reconnects = async () => (await seriesValue(service, 'amqp_concurrency_amqp_reconnects_total')) ?? 0;
  const faults: [string, () => unknown][] = [
    ['a frame cut in the middle (server to client)', () => proxy.cutAfter(7, 'downstream')],
    ['a reset of every connection', () => proxy.resetAll()],
  ];
  if (faultsOk)
    faults.push(['a forced close by the broker', () => closeConnections(`consume (pid ${process.pid})`)]);
  let done = 0;
  for (const [what, fault] of faults) {
    done += 1;
    const before = await reconnects();
    const ranBefore = tally(path, n).ran;
    await waitFor('some progress first', () => tally(path, n).ran > ranBefore + 200, 60_000);
    const at = performance.now();
    await fault();
    await waitFor(`a reconnect after ${what}`, async () => (await reconnects()) > before, 30_000);
    t.diagnostic(`${what}: consuming again after ${Math.round(performance.now() - at)} ms`);
  }
  await waitFor(`all ${n} to run`, () => tally(path, n).lost === 0, 120_000);
  await waitFor(
    'nothing in flight',
    () => service.dispatcher.inFlight === 0 && service.health().status === 'ok',
  );
  const { duplicates, lost } = tally(path, n);
  t.diagnostic(
    `${n} tasks, ${done} faults: ${lost} lost, ${duplicates} ran twice (${((100 * duplicates) / n).toFixed(2)}%)`,
  );
  assert.equal(lost, 0);
  assert.equal(await b.count(q), 0);
  // Running tasks and the ack window only: at most 0.5%.
  assert.ok(duplicates <= n * 0.005, `${duplicates} duplicates`);
});

test('a dead-letter queue deleted under the service: the copy is returned, the original goes back, and ends dead-lettered once the queue is declared again', async (t) => {
  const b = await broker(t);
  const path = runsFile(t);
  const service = await startService(t, b, testConfig(t, { workers: 1 }));
  const q = service.config.queue;
  await b.channel.deleteQueue(`${q}.dead`);
  await b.send(q, { func: 'recordThenFail', args: [path, 'x'] }, { messageId: 'x' });
  // The first copy is unroutable: the original goes back and runs again; meanwhile the
  // topology is declared again, so a later copy lands. (Reading a missing queue would
  // close the test's channel: look on a throwaway one.)
  await waitFor('the dead-letter queue declared again', async () => {
    const ch = await b.connection.createChannel();
    ch.on('error', () => {});
    const there = await ch.checkQueue(`${q}.dead`).then(
      () => true,
      () => false,
    );
    await ch.close().catch(() => {});
    return there;
  });
  const [dead] = await b.take(`${q}.dead`, 1, 30_000);
  assert.equal(dead?.properties.headers?.['x-error-kind'], 'failed');
  await waitFor('nothing in flight', () => service.dispatcher.inFlight === 0);
  assert.equal(await b.count(q), 0, 'the original was acked only after its copy landed');
  assert.ok(
    ((await seriesValue(service, 'amqp_concurrency_publish_failures_total{reason="unroutable"}')) ?? 0) >= 1,
  );
  const runs = tally(path, 0).ran;
  t.diagnostic(`ran ${runs} time(s) before its copy landed`);
});

test('a cut on the publishing connection mid-frame: every dead letter lands once the connection is back', async (t) => {
  const b = await broker(t);
  const proxy = await proxyFor(t, AMQP_URL);
  const path = runsFile(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { amqpUrl: through(proxy), connectTimeout: 2, workers: 2, prefetch: 4 }),
  );
  const q = service.config.queue;
  for (let i = 0; i < 20; i++)
    await b.send(q, { func: 'recordThenFail', args: [path, `f${i}`, 20] }, { messageId: `f${i}` });
  await waitFor('a few to fail', () => (tally(path, 0).ran ?? 0) >= 4);
  // Both connections: the copy being written is cut inside its frame.
  proxy.cutAfter(30, 'upstream');
  const dead: string[] = [];
  await waitFor(
    'a dead letter of every message',
    async () => {
      for (const m of await b.drainQueue(`${q}.dead`)) dead.push(String(m.properties.messageId));
      return new Set(dead).size === 20;
    },
    60_000,
  );
  await waitFor('nothing in flight', () => service.dispatcher.inFlight === 0, 30_000);
  dead.push(...(await b.drainQueue(`${q}.dead`)).map((m) => String(m.properties.messageId)));
  // At least once: a copy whose confirm was cut off is published again.
  t.diagnostic(`${dead.length} dead letters for 20 messages; ${tally(path, 0).duplicates} ran twice`);
  assert.equal(await b.count(q), 0);
});
