// Every row of the outcome table (README "The message"), against the real broker and real worker processes.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GetMessage } from 'amqplib';
import { credentialsOf } from '../support/broker-url.ts';
import { AMQP_URL, broker, seriesValue, startService, testConfig, waitFor } from '../support/helpers.ts';

function header(m: GetMessage, name: string): unknown {
  return m.properties.headers?.[name];
}

test('a good task runs once, is acked, and its reply carries the result', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(
    q,
    { func: 'add', args: [2, 3] },
    { replyTo: replies.queue, correlationId: 'c-1', messageId: 'm-1' },
  );
  await b.send(
    q,
    { func: 'echo', args: ['a', 1], kwargs: { k: true } },
    { replyTo: replies.queue, correlationId: 'c-2' },
  );
  await b.send(q, { func: 'add', args: [1, 1] }); // no reply_to: no reply

  const more = await b.take(replies.queue, 2);
  const byId = new Map(more.map((m) => [m.properties.correlationId, JSON.parse(m.content.toString())]));
  assert.deepEqual(byId.get('c-1'), { ok: true, result: 5 });
  assert.deepEqual(byId.get('c-2'), { ok: true, result: ['a', 1, { k: true }] });
  await waitFor(
    'three successes',
    async () =>
      (await seriesValue(service, 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}')) === 2,
  );
  assert.equal(await b.count(q), 0);
  assert.equal(await b.count(`${q}.dead`), 0);
  assert.equal(
    await seriesValue(service, 'amqp_concurrency_tasks_total{func="echo",outcome="succeeded"}'),
    1,
  );
  assert.equal(service.dispatcher.inFlight, 0);
});

test('each kind of malformed message is dead-lettered with its reason and the others still run', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { maxMessageBytes: 200 }));
  const q = service.config.queue;
  const bad: [string, string | Buffer | object][] = [
    ['body is not JSON', 'not json at all'],
    ['body must be a JSON object, got an array', [1, 2]],
    ['body must be a JSON object, got null', 'null'],
    ['func is missing', { args: [1] }],
    ['func must be a string', { func: 42 }],
    ['unknown func "nope"', { func: 'nope' }],
    ['unknown func "constructor"', { func: 'constructor' }],
    ['unknown func "__proto__"', { func: '__proto__' }],
    ['unknown func "default"', { func: 'default' }],
    ['unknown func "toString"', { func: 'toString' }],
    ['args must be an array', { func: 'add', args: { a: 1 } }],
    ['kwargs must be an object', { func: 'add', args: [1, 2], kwargs: [1] }],
    ['over the limit of 200', { func: 'echo', args: ['x'.repeat(300)] }],
    ['body is not JSON', Buffer.from([0xff, 0xfe, 0x00])],
  ];
  for (const [i, [, body]] of bad.entries()) {
    await b.send(q, body, { messageId: `bad-${i}`, headers: { mine: 'kept' }, expiration: '60000' });
    await b.send(q, { func: 'add', args: [i, 1] }); // a good one between each bad one
  }
  await waitFor(
    'every good task to succeed',
    async () =>
      (await seriesValue(service, 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}')) ===
      bad.length,
  );
  const dead = await b.take(`${q}.dead`, bad.length);
  const byId = new Map(dead.map((m) => [m.properties.messageId, m]));
  for (const [i, [reason, body]] of bad.entries()) {
    const m = byId.get(`bad-${i}`);
    assert.ok(m, `bad-${i} was dead-lettered`);
    assert.equal(header(m, 'x-error-kind'), 'rejected');
    assert.match(
      String(header(m, 'x-error-message')),
      new RegExp(reason.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')),
    );
    assert.equal(header(m, 'x-attempts'), 1);
    assert.equal(header(m, 'x-original-routing-key'), q);
    assert.equal(header(m, 'mine'), 'kept', 'the original headers are kept');
    assert.equal(m.properties.expiration, undefined, 'a dead letter does not expire');
    const original = Buffer.isBuffer(body)
      ? body
      : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
    assert.deepEqual(m.content, original, 'the body is kept byte for byte');
  }
  assert.equal(await b.count(q), 0);
  assert.equal(
    await seriesValue(service, 'amqp_concurrency_messages_dead_lettered_total{reason="rejected"}'),
    bad.length,
  );
  // Unknown or missing names are counted under one label, so label values stay bounded.
  assert.equal(
    await seriesValue(service, 'amqp_concurrency_tasks_total{func="<unknown>",outcome="rejected"}'),
    bad.length - 2,
  );
  assert.equal(await seriesValue(service, 'amqp_concurrency_tasks_total{func="add",outcome="rejected"}'), 2);
});

test('a task that throws or rejects is failed: dead-lettered with its error, replied to, acked', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(
    q,
    { func: 'fail', args: ['boom'] },
    { replyTo: replies.queue, correlationId: 'f1', messageId: 'f1' },
  );
  await b.send(q, { func: 'rejectLater' }, { messageId: 'f2' });
  await b.send(q, { func: 'throwString' }, { messageId: 'f3' });
  await b.send(
    q,
    { func: 'unserializable' },
    { replyTo: replies.queue, correlationId: 'f4', messageId: 'f4' },
  );
  const dead = await b.take(`${q}.dead`, 4);
  const byId = new Map(dead.map((m) => [m.properties.messageId, m]));
  assert.equal(header(byId.get('f1') as GetMessage, 'x-error-kind'), 'failed');
  assert.equal(header(byId.get('f1') as GetMessage, 'x-error-message'), 'boom');
  assert.equal(header(byId.get('f2') as GetMessage, 'x-error-message'), 'rejected on purpose');
  assert.equal(header(byId.get('f3') as GetMessage, 'x-error-message'), 'a bare string');
  assert.match(String(header(byId.get('f4') as GetMessage, 'x-error-message')), /cannot be sent as JSON/);
  const replyList = await b.take(replies.queue, 2);
  const reply = replyList.find((m) => m.properties.correlationId === 'f1');
  assert.deepEqual(JSON.parse(String(reply?.content)), {
    ok: false,
    error: { kind: 'failed', message: 'boom' },
  });
  assert.equal(await b.count(q), 0);
  assert.equal(await seriesValue(service, 'amqp_concurrency_tasks_total{func="fail",outcome="failed"}'), 1);
  assert.equal(
    await seriesValue(service, 'amqp_concurrency_messages_dead_lettered_total{reason="failed"}'),
    4,
  );
  // A failure does not cost a worker.
  assert.equal(
    await seriesValue(service, 'amqp_concurrency_worker_restarts_total{reason="crash"}'),
    undefined,
  );
});

test('a task past the timeout is killed, dead-lettered as timeout, and the pool refills', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1, workerTimeout: 0.5 }));
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(q, { func: 'spin' }, { messageId: 's1', replyTo: replies.queue, correlationId: 's1' });
  await b.send(q, { func: 'add', args: [1, 2] }, { replyTo: replies.queue, correlationId: 'after' });
  const dead = await b.take(`${q}.dead`, 1);
  assert.equal(header(dead[0] as GetMessage, 'x-error-kind'), 'timeout');
  assert.match(String(header(dead[0] as GetMessage, 'x-error-message')), /time limit of 0.5 s/);
  const got = await b.take(replies.queue, 2);
  const byId = new Map(got.map((m) => [m.properties.correlationId, JSON.parse(String(m.content))]));
  assert.equal(byId.get('s1').error.kind, 'timeout');
  assert.deepEqual(byId.get('after'), { ok: true, result: 3 }, 'the next task ran on the replacement worker');
  assert.equal(await seriesValue(service, 'amqp_concurrency_worker_restarts_total{reason="timeout"}'), 1);
  assert.equal(await seriesValue(service, 'amqp_concurrency_tasks_total{func="spin",outcome="timeout"}'), 1);
  await waitFor('the pool to be whole', () => service.health().status === 'ok');
});

test('a worker that dies mid-task is crashed: dead-lettered, counted, replaced', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1 }));
  const q = service.config.queue;
  await b.send(q, { func: 'crash', args: [7] }, { messageId: 'c1' });
  await b.send(q, { func: 'add', args: [1, 2] });
  const dead = await b.take(`${q}.dead`, 1);
  assert.equal(header(dead[0] as GetMessage, 'x-error-kind'), 'crashed');
  assert.match(String(header(dead[0] as GetMessage, 'x-error-message')), /exit code 7/);
  await waitFor(
    'the next task',
    async () =>
      (await seriesValue(service, 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}')) === 1,
  );
  assert.equal(await seriesValue(service, 'amqp_concurrency_worker_restarts_total{reason="crash"}'), 1);
  assert.equal(
    await seriesValue(service, 'amqp_concurrency_messages_dead_lettered_total{reason="crashed"}'),
    1,
  );
});

test('a task learns its message id, redelivery flag, attempt and deadline', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workerTimeout: 7 }));
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const sent = Date.now();
  await b.send(service.config.queue, { func: 'context' }, { messageId: 'ctx-1', replyTo: replies.queue });
  const [reply] = await b.take(replies.queue, 1);
  const { ok, result } = JSON.parse(String(reply?.content));
  assert.equal(ok, true);
  assert.equal(result.messageId, 'ctx-1');
  assert.equal(result.redelivered, false);
  assert.equal(result.attempt, 1);
  assert.equal(result.func, 'context');
  assert.ok(
    result.deadline >= sent + 7000 && result.deadline <= Date.now() + 7000,
    'the deadline is now + timeout',
  );
});

test('/health and /metrics tell the truth over real HTTP', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 2 }));
  const base = `http://127.0.0.1:${service.httpPort}`;
  const health = await fetch(`${base}/health`);
  assert.equal(health.status, 200);
  const body = (await health.json()) as { status: string; workers: { up: number } };
  assert.equal(body.status, 'ok');
  assert.equal(body.workers.up, 2);
  assert.ok(!JSON.stringify(body).includes(credentialsOf(AMQP_URL)), 'no password in /health');
  const metrics = await (await fetch(`${base}/metrics`)).text();
  assert.match(metrics, /^amqp_concurrency_workers\{state="idle"\} 2$/m);
  assert.match(metrics, /^amqp_concurrency_amqp_connected 1$/m);
  assert.match(metrics, /^process_resident_memory_bytes \d+/m);
});
