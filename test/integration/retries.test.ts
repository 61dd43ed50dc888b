// Retries through per-delay TTL queues, and quorum queues with a deliberate delivery limit.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { GetMessage } from 'amqplib';
import { broker, freshName, startService, testConfig, waitFor } from '../support/helpers.ts';

function tempDir(t: { after: (fn: () => unknown) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'retries-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function header(m: GetMessage | undefined, name: string): unknown {
  return m?.properties.headers?.[name];
}

test('a message that fails N+1 times with --max-retries N ends dead with x-attempts N+1, after growing delays', async (t) => {
  const b = await broker(t);
  const config = testConfig(t, { maxRetries: 2, retryDelay: 0.2 });
  const service = await startService(t, b, config);
  const q = service.config.queue;
  b.cleanup(`${q}.retry.200ms`, `${q}.retry.400ms`);
  const record = join(tempDir(t), 'attempts.jsonl');
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(q, { func: 'failAndRecord', args: [record] }, { messageId: 'r1', replyTo: replies.queue });
  const [dead] = await b.take(`${q}.dead`, 1);
  assert.equal(header(dead, 'x-error-kind'), 'failed');
  assert.equal(header(dead, 'x-error-message'), 'attempt 3 failed');
  assert.equal(header(dead, 'x-attempts'), 3);
  assert.equal(header(dead, 'x-original-routing-key'), q);
  assert.equal(dead?.properties.messageId, 'r1');
  const attempts = readFileSync(record, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { at: number; attempt: number });
  assert.deepEqual(
    attempts.map((a) => a.attempt),
    [1, 2, 3],
  );
  const [first, second, third] = attempts.map((a) => a.at) as [number, number, number];
  assert.ok(second - first >= 200, `the first retry waited at least 200 ms (${second - first})`);
  assert.ok(third - second >= 400, `the second retry waited at least 400 ms (${third - second})`);
  // One reply, at the end; none while retries remained.
  const got = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(got[0]?.content)), {
    ok: false,
    error: { kind: 'failed', message: 'attempt 3 failed' },
  });
  assert.equal(await b.count(replies.queue), 0);
  assert.equal(await b.count(q), 0);
});

test('a retry that succeeds is acked and replied to once; timeouts and crashes count as attempts', async (t) => {
  const b = await broker(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { maxRetries: 1, retryDelay: 0.05, workerTimeout: 0.5 }),
  );
  const q = service.config.queue;
  b.cleanup(`${q}.retry.50ms`);
  const marker = join(tempDir(t), 'marker');
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(q, { func: 'failOnce', args: [marker] }, { replyTo: replies.queue, correlationId: 'once' });
  await b.send(q, { func: 'crash' }, { messageId: 'crash' });
  await b.send(q, { func: 'spin' }, { messageId: 'spin' });
  await b.send(q, { func: 'nope' }, { messageId: 'rejected' });
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 'ok on attempt 2' });
  const dead = await b.take(`${q}.dead`, 3);
  const byId = new Map(dead.map((m) => [m.properties.messageId, m]));
  assert.equal(header(byId.get('crash'), 'x-error-kind'), 'crashed');
  assert.equal(header(byId.get('crash'), 'x-attempts'), 2);
  assert.equal(header(byId.get('spin'), 'x-error-kind'), 'timeout');
  assert.equal(header(byId.get('spin'), 'x-attempts'), 2);
  assert.equal(header(byId.get('rejected'), 'x-error-kind'), 'rejected');
  assert.equal(header(byId.get('rejected'), 'x-attempts'), 1, 'a malformed message is never retried');
  assert.equal(await b.count(q), 0);
});

test('--queue-type quorum declares a quorum queue whose own dead-lettering ends in <queue>.dead', async (t) => {
  const b = await broker(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { queueType: 'quorum', deliveryLimit: 2, workers: 1 }),
  );
  const q = service.config.queue;
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(q, { func: 'add', args: [1, 2] }, { replyTo: replies.queue });
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 3 });
  // Redeclaring it as classic is refused: it is a quorum queue.
  const probe = await b.connection.createChannel();
  probe.on('error', () => {});
  await assert.rejects(probe.assertQueue(q, { durable: true }), /PRECONDITION_FAILED/);

  // A message that is never settled (as if it killed the master each time: its channel
  // goes with the delivery unacked) comes back until the delivery limit; then the broker
  // dead-letters it to <queue>.dead itself. A client crash counts on every version.
  await service.drain('test: hand the queue to a raw consumer');
  await b.send(q, { func: 'add', args: [0, 0] }, { messageId: 'poison' });
  for (let i = 0; i < 4; i++) {
    const raw = await b.connection.createChannel();
    const m = await raw.get(q);
    await raw.close();
    if (m === false) break;
  }
  const [dead] = await b.take(`${q}.dead`, 1);
  assert.equal(dead?.properties.messageId, 'poison');
  const xDeath = header(dead, 'x-death') as { reason: string }[] | undefined;
  assert.equal(xDeath?.[0]?.reason, 'delivery_limit');
  assert.equal(await b.count(q), 0);
});

test('which give-backs count towards a quorum queue delivery limit, on this broker: reject always, nack before 4.3', async (t) => {
  const b = await broker(t);
  const version = String(b.connection.connection.serverProperties.version);
  const nackCounts = !/^(4\.([3-9]|\d{2,})|[5-9])\./.test(version);
  t.diagnostic(`RabbitMQ ${version}: nack ${nackCounts ? 'counts' : 'does not count'}`);
  const ch = await b.connection.createChannel();
  for (const how of ['reject', 'nack'] as const) {
    const q = `${freshName(t)}.${how}`;
    b.cleanup(q, `${q}.dead`);
    await b.channel.assertQueue(`${q}.dead`, { durable: true });
    await b.channel.assertQueue(q, {
      durable: true,
      arguments: {
        'x-queue-type': 'quorum',
        'x-delivery-limit': 1,
        'x-dead-letter-exchange': '',
        'x-dead-letter-routing-key': `${q}.dead`,
      },
    });
    await b.send(q, { func: 'add' }, { messageId: how });
    // Limit 1: the second give-back passes it, if give-backs of this kind count.
    for (let i = 0; i < 3; i++) {
      const m = await waitFor(
        `the message in ${q}`,
        async () => (await ch.get(q)) || (await b.count(`${q}.dead`)) > 0,
      );
      if (m === true || m === false) break; // dead-lettered already
      if (how === 'reject') ch.reject(m, true);
      else ch.nack(m, false, true);
    }
    const counted = how === 'reject' || nackCounts;
    if (counted) {
      const [dead] = await b.take(`${q}.dead`, 1);
      assert.equal(dead?.properties.messageId, how);
    } else {
      // Still in the queue, not dead-lettered, after three give-backs.
      assert.equal(await b.count(`${q}.dead`), 0);
      assert.ok((await ch.get(q)) !== false, 'the message is still in the queue');
    }
  }
});

test('with --queue-type quorum, <queue>.dead and the retry queues are quorum queues, and a retry goes through them', async (t) => {
  const b = await broker(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { queueType: 'quorum', maxRetries: 1, retryDelay: 0.1, workers: 1 }),
  );
  const q = service.config.queue;
  b.cleanup(`${q}.retry.100ms`);
  const record = join(tempDir(t), 'attempts.jsonl');
  await b.send(q, { func: 'failAndRecord', args: [record] }, { messageId: 'q1' });
  const [dead] = await b.take(`${q}.dead`, 1);
  assert.equal(dead?.properties.messageId, 'q1');
  assert.equal(header(dead, 'x-attempts'), 2);
  assert.equal(
    readFileSync(record, 'utf8').trim().split('\n').length,
    2,
    'ran once, then once more after the retry delay',
  );
  // Redeclaring either as a classic queue is refused: they are quorum queues.
  for (const name of [`${q}.dead`, `${q}.retry.100ms`]) {
    const probe = await b.connection.createChannel();
    probe.on('error', () => {});
    await assert.rejects(probe.assertQueue(name, { durable: true }), /PRECONDITION_FAILED/, name);
  }
});
