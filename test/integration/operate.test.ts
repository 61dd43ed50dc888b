// Steering a running service: resizing, recycling, the soft time limit and reload.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { Broker } from '../support/helpers.ts';
import { broker, gate, seriesValue, startService, testConfig, waitFor } from '../support/helpers.ts';

async function call(b: Broker, queue: string, replyQueue: string, body: object, id: string) {
  await b.send(queue, body, { replyTo: replyQueue, correlationId: id, messageId: id });
}

function results(messages: { properties: { correlationId?: unknown }; content: Buffer }[]) {
  return new Map(messages.map((m) => [String(m.properties.correlationId), JSON.parse(String(m.content))]));
}

/** An absent counter is 0 here. */
async function metric(service: Parameters<typeof seriesValue>[0], series: string) {
  return (await seriesValue(service, series)) ?? 0;
}

test('the pool grows and shrinks while tasks run, the prefetch follows, nothing is lost', async (t) => {
  const b = await broker(t);
  // The first tasks stay busy until the gate opens: three busy workers is then a state the
  // test waits for, not a moment it has to catch while the new workers fork on a busy machine.
  const service = await startService(t, b, testConfig(t, { workers: 1, prefetch: 4, workerTimeout: 60 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const held = gate(t);
  for (let i = 0; i < 6; i++)
    await call(b, q, replies.queue, { func: 'waitAtGate', args: [held.path] }, `a${i}`);
  service.setWorkers(3);
  await waitFor('three busy workers', () => service.health().workers.busy === 3, 60_000);
  assert.equal(service.status().prefetch, 12);
  assert.equal(service.status().workers.length, 3);
  held.open();
  service.setWorkers(1);
  assert.equal(service.status().prefetch, 4);
  for (let i = 0; i < 4; i++) await call(b, q, replies.queue, { func: 'add', args: [i, 1] }, `b${i}`);
  const got = results(await b.take(replies.queue, 10));
  assert.equal(got.size, 10);
  for (const [, r] of got) assert.equal(r.ok, true);
  await waitFor('one worker left', () => service.status().workers.length === 1);
  assert.equal(service.health().status, 'ok');
  assert.throws(() => service.setWorkers(0), RangeError);
  // A scale-down is not a restart.
  assert.equal(await metric(service, 'amqp_concurrency_worker_restarts_total{reason="recycle"}'), 0);
});

test('with no prefetch given, the window follows the task duration, and what it outgrew goes back unrun', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 2 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const start = service.status().prefetch;
  for (let i = 0; i < 50; i++) await call(b, q, replies.queue, { func: 'add', args: [i, 1] }, `a${i}`);
  await waitFor('a deeper window for tiny tasks', () => service.status().prefetch > start);
  assert.ok(service.status().prefetch <= 1000);
  // Now long ones: more than a second of work per worker arrives at once.
  for (let i = 0; i < 16; i++) await call(b, q, replies.queue, { func: 'sleep', args: [0.4] }, `s${i}`);
  await waitFor('a shallow window for long tasks', () => service.status().prefetch <= 10, 10_000);
  const got = results(await b.take(replies.queue, 66, 20_000));
  assert.equal(got.size, 66, 'every task ran and replied');
  for (const [, r] of got) assert.equal(r.ok, true);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal((await b.drainQueue(replies.queue)).length, 0, 'none ran twice');
});

test('a long task does not hold back the acks of the short ones after it: the window keeps moving', async (t) => {
  const b = await broker(t);
  // A window of 4: were the acks above the long task held until it ends, the short ones
  // after it would stop at three.
  const service = await startService(t, b, testConfig(t, { workers: 2, prefetch: 4, workerTimeout: 60 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  // The long task runs until the test opens its gate: however slow the machine, the short
  // ones can only all reply while it still runs if their acks move the window past it.
  const long = gate(t);
  await call(b, q, replies.queue, { func: 'waitAtGate', args: [long.path] }, 'long');
  for (let i = 0; i < 20; i++) await call(b, q, replies.queue, { func: 'add', args: [i, 1] }, `s${i}`);
  const first = results(await b.take(replies.queue, 20));
  assert.equal(first.has('long'), false, 'the long task is still running');
  assert.equal(first.size, 20, 'all twenty short ones replied meanwhile');
  long.open();
  assert.equal(results(await b.take(replies.queue, 1)).get('long')?.ok, true);
});

test('--max-tasks-per-worker replaces a worker between tasks, counted as recycle', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1, maxTasksPerWorker: 2 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  for (let i = 0; i < 6; i++) await call(b, q, replies.queue, { func: 'pid' }, `p${i}`);
  const got = results(await b.take(replies.queue, 6));
  const pids = [0, 1, 2, 3, 4, 5].map((i) => got.get(`p${i}`)?.result);
  assert.equal(pids[0], pids[1]);
  assert.notEqual(pids[1], pids[2]);
  assert.equal(pids[2], pids[3]);
  assert.notEqual(pids[3], pids[4]);
  assert.equal(new Set(pids).size, 3);
  await waitFor(
    'the third recycle',
    async () => (await metric(service, 'amqp_concurrency_worker_restarts_total{reason="recycle"}')) === 3,
  );
  assert.equal(await metric(service, 'amqp_concurrency_worker_restarts_total{reason="crash"}'), 0);
});

test('--max-worker-memory replaces a worker whose RSS grew past the limit, between tasks', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1, maxWorkerMemory: 200 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await call(b, q, replies.queue, { func: 'grow', args: [10] }, 'small');
  await call(b, q, replies.queue, { func: 'grow', args: [250] }, 'big');
  await call(b, q, replies.queue, { func: 'pid' }, 'after');
  const got = results(await b.take(replies.queue, 3));
  assert.equal(got.get('small')?.result, got.get('big')?.result, 'under the limit: the same worker');
  assert.notEqual(got.get('big')?.result, got.get('after')?.result, 'over the limit: replaced');
  assert.equal(got.get('big')?.ok, true, 'the task that grew it still succeeded');
  assert.equal(await metric(service, 'amqp_concurrency_worker_restarts_total{reason="recycle"}'), 1);
});

test('at the time limit the AbortSignal fires: a task that honours it ends as timeout and keeps its worker', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1, workerTimeout: 0.3, killGrace: 2 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await call(b, q, replies.queue, { func: 'pid' }, 'before');
  await call(b, q, replies.queue, { func: 'cooperative' }, 'coop');
  await call(b, q, replies.queue, { func: 'pid' }, 'after');
  const got = results(await b.take(replies.queue, 3));
  assert.deepEqual(got.get('coop'), {
    ok: false,
    error: {
      kind: 'timeout',
      message: 'task ran past its time limit of 0.3 s and stopped on its AbortSignal',
    },
  });
  assert.equal(got.get('before')?.result, got.get('after')?.result, 'the same worker');
  assert.equal(await metric(service, 'amqp_concurrency_worker_restarts_total{reason="timeout"}'), 0);
  const [dead] = await b.take(`${q}.dead`, 1);
  assert.equal(dead?.properties.headers?.['x-error-kind'], 'timeout');
});

test('a task that ignores the AbortSignal is killed after the grace', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1, workerTimeout: 0.2, killGrace: 0.3 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await call(b, q, replies.queue, { func: 'spin' }, 'spin');
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)).error, {
    kind: 'timeout',
    message: 'task ran past its time limit of 0.2 s',
  });
  await waitFor(
    'the restart',
    async () => (await metric(service, 'amqp_concurrency_worker_restarts_total{reason="timeout"}')) === 1,
  );
});

test('reload rolls the workers onto new task code with no message lost', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'reload-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const module = join(dir, 'tasks.mjs');
  // version(ms, gate) waits for the gate file (when given), then ms: the tasks before the
  // reload are still running when it starts, whatever the machine's speed.
  const write = (version: string) =>
    writeFileSync(
      module,
      `import { existsSync } from 'node:fs';
      const pause = (ms) => new Promise((r) => setTimeout(r, ms));
      export async function version(ms, gate) {
        while (gate && !existsSync(gate)) await pause(20);
        await pause(ms);
        return ${JSON.stringify(version)};
      }`,
    );
  write('v1');
  const b = await broker(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { workers: 2, taskPath: module, workerTimeout: 60 }),
  );
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const running = gate(t);
  for (let i = 0; i < 10; i++)
    await call(b, q, replies.queue, { func: 'version', args: [50, running.path] }, `before${i}`);
  await waitFor('both workers running a task', () => service.health().workers.busy === 2);
  write('v2');
  const reloading = service.reload();
  for (let i = 0; i < 10; i++) await call(b, q, replies.queue, { func: 'version', args: [50] }, `during${i}`);
  running.open();
  await reloading;
  assert.ok(service.health().workers.up >= 1);
  for (let i = 0; i < 4; i++) await call(b, q, replies.queue, { func: 'version', args: [0] }, `after${i}`);
  const got = results(await b.take(replies.queue, 24));
  assert.equal(got.size, 24, 'every message answered');
  for (let i = 0; i < 4; i++) assert.equal(got.get(`after${i}`)?.result, 'v2');
  assert.equal(await b.count(`${q}.dead`), 0);
  await waitFor('two workers', () => service.status().workers.length === 2);
});

test('a reload whose new code does not load keeps the old workers', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'reload-bad-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const module = join(dir, 'tasks.mjs');
  writeFileSync(module, 'export function ok() { return "old"; }');
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 2, taskPath: module }));
  const before = service.status().workers.map((w) => w.pid);
  writeFileSync(module, 'throw new Error("broken new code");');
  await service.reload();
  assert.deepEqual(
    service.status().workers.map((w) => w.pid),
    before,
  );
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await call(b, service.config.queue, replies.queue, { func: 'ok' }, 'x');
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 'old' });
});
