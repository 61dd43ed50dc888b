// The producer client against the real broker: confirmed sends, calls through direct
// reply-to (against a running service, and against a queue where the test plays the
// service), and every way a call can end without a result.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GetMessage } from 'amqplib';
import { type Client, createClient } from '../../src/client/client.ts';
import { ClientError, SendManyError, TaskCallError } from '../../src/errors.ts';
import type * as fixtures from '../fixtures/tasks.ts';
import {
  AMQP_URL,
  type Broker,
  broker,
  deleteExchangesAfter,
  freshName,
  startService,
  testConfig,
  waitFor,
} from '../support/helpers.ts';

type TestContext = Parameters<typeof broker>[0];

/** An exchange and a queue bound to it with `rk`, with no consumer: the test reads what arrives. */
async function quietQueue(t: TestContext, b: Broker): Promise<{ exchange: string; queue: string }> {
  const queue = freshName(t);
  const exchange = `${queue}.x`;
  // Durable: RabbitMQ 4 deprecates transient non-exclusive queues (and will refuse them).
  await b.channel.assertExchange(exchange, 'direct', { durable: true, autoDelete: false });
  await b.channel.assertQueue(queue, { durable: true });
  await b.channel.bindQueue(queue, exchange, 'rk');
  b.cleanup(queue);
  deleteExchangesAfter(t, exchange);
  return { exchange, queue };
}

async function client<T extends object = typeof fixtures>(
  t: TestContext,
  exchange: string,
  routingKey = 'rk',
): Promise<Client<T>> {
  const c = await createClient<T>({ url: AMQP_URL, exchange, routingKey });
  t.after(() => c.close());
  return c;
}

/** Answers a request as the service would: to its reply_to, with its correlation id. */
async function reply(b: Broker, request: GetMessage, body: unknown): Promise<void> {
  const { replyTo, correlationId } = request.properties;
  await new Promise<void>((resolve, reject) =>
    b.channel.publish('', String(replyTo), Buffer.from(JSON.stringify(body)), { correlationId }, (err) =>
      err ? reject(err) : resolve(),
    ),
  );
}

const isCode = (code: string) => (err: unknown) => {
  assert.ok(err instanceof ClientError, String(err));
  assert.equal(err.code, code);
  return true;
};

const isKind = (kind: string, message?: RegExp) => (err: unknown) => {
  assert.ok(err instanceof TaskCallError, String(err));
  assert.equal(err.code, 'ERR_TASK_CALL');
  assert.equal(err.kind, kind);
  if (message !== undefined) assert.match(err.message, message);
  return true;
};

test('send resolves with the message id once confirmed; the message arrives as the service expects it', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  const c = await client(t, exchange);

  const id = await c.send('add', [1, 2]);
  assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  assert.equal(
    await c.send('echo', ['x'], { k: true }, { messageId: 'order-42', headers: { 'x-trace': 't-1' } }),
    'order-42',
  );
  // Confirmed means routed and stored: both are in the queue now, no waiting needed.
  const [first, second] = await b.drainQueue(queue);
  assert.ok(first !== undefined && second !== undefined);
  assert.deepEqual(JSON.parse(first.content.toString()), { func: 'add', args: [1, 2] });
  assert.equal(first.properties.messageId, id);
  assert.equal(first.properties.deliveryMode, 2, 'persistent');
  assert.equal(first.properties.contentType, 'application/json');
  assert.equal(first.properties.replyTo, undefined);
  assert.equal(first.fields.routingKey, 'rk');
  assert.deepEqual(JSON.parse(second.content.toString()), { func: 'echo', args: ['x'], kwargs: { k: true } });
  assert.equal(second.properties.messageId, 'order-42');
  assert.equal(second.properties.headers?.['x-trace'], 't-1');
});

test('call returns results from a running service, and rejects with the outcome of each failure', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workerTimeout: 1 }));
  const c = await client(t, service.config.exchange, service.config.routingKey);

  assert.equal(await c.call('add', [20, 22]), 42);
  assert.deepEqual(await c.call('echo', ['a', 1], { k: true }), ['a', 1, { k: true }]);
  await assert.rejects(c.call('fail', ['boom']), isKind('failed', /^boom$/));
  await assert.rejects(c.call('rejectLater', ['later']), isKind('failed', /^later$/));
  await assert.rejects(c.call('crash', [3]), isKind('crashed'));
  await assert.rejects(c.call('spin', []), isKind('timeout'));
  // An unknown func is dead-lettered as rejected; the loose client lets us name one.
  const loose = await client<Record<string, (...args: unknown[]) => unknown>>(
    t,
    service.config.exchange,
    service.config.routingKey,
  );
  await assert.rejects(loose.call('noSuchTask', []), isKind('rejected', /noSuchTask/));
  // The client still works after all that.
  assert.equal(await c.call('add', [1, 1]), 2);
});

test('one reply consumer serves many concurrent calls, each getting its own answer', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 4 }));
  const c = await client(t, service.config.exchange, service.config.routingKey);
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  t.after(() => process.off('unhandledRejection', onUnhandled));

  // Failures come back fast, often before the confirm of their own publish: each must
  // still reject its own call, and nothing may go unhandled.
  const calls = Array.from({ length: 60 }, (_, i) =>
    i % 2 === 0 ? c.call('add', [i, 1000]) : c.call('fail', [`no ${i}`]),
  );
  const settled = await Promise.allSettled(calls);
  settled.forEach((s, i) => {
    if (i % 2 === 0) assert.deepEqual(s, { status: 'fulfilled', value: i + 1000 });
    else {
      assert.equal(s.status, 'rejected');
      isKind('failed', new RegExp(`^no ${i}$`))((s as PromiseRejectedResult).reason);
    }
  });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(unhandled, []);
});

test('a call that nobody answers rejects with ERR_CALL_TIMEOUT; a late reply is ignored', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  const c = await client(t, exchange);

  const started = performance.now();
  await assert.rejects(c.call('add', [1, 2], undefined, { timeoutMs: 300 }), isCode('ERR_CALL_TIMEOUT'));
  const waited = performance.now() - started;
  // Its 300 ms, less what Node's cached clock may lag when the timer is armed; the upper
  // bound only tells a timeout from a call left hanging.
  assert.ok(waited >= 250 && waited < 30_000, `waited ${waited} ms`);

  // The request is there, asking for a direct reply with a correlation id.
  const [late] = await b.drainQueue(queue);
  assert.ok(late !== undefined);
  assert.match(String(late.properties.replyTo), /^amq\.rabbitmq\.reply-to\./);
  assert.equal(typeof late.properties.correlationId, 'string');

  // A second call; the test answers the first (too late) and then the second.
  const second = c.call('add', [2, 3], undefined, { timeoutMs: 10_000 });
  const [request] = await b.take(queue, 1);
  assert.ok(request !== undefined);
  assert.notEqual(request.properties.correlationId, late.properties.correlationId);
  await reply(b, late, { ok: true, result: 'stale' });
  await reply(b, request, { ok: true, result: 5 });
  assert.equal(await second, 5);

  // Replies that are not the service's shape reject, rather than resolve with garbage.
  // Its rejection is awaited before the reply goes: the reply can reach the client
  // before the test's own publish is confirmed, and a rejection nobody awaits yet fails
  // the test as unhandled.
  const third = assert.rejects(
    c.call('add', [0, 0], undefined, { timeoutMs: 10_000 }),
    isCode('ERR_BAD_REPLY'),
  );
  const [odd] = await b.take(queue, 1);
  assert.ok(odd !== undefined);
  await reply(b, odd, { result: 0 });
  await third;
});

test('send to a routing key no queue is bound to rejects with ERR_UNROUTABLE instead of a silent drop', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  const lost = await client(t, exchange, 'nobody-listens');
  await assert.rejects(lost.send('add', [1, 2]), (err: unknown) => {
    isCode('ERR_UNROUTABLE')(err);
    assert.match((err as Error).message, /routing key "nobody-listens"/);
    return true;
  });
  // A call fails the same way at once, without waiting for its timeout.
  const started = performance.now();
  await assert.rejects(lost.call('add', [1, 2], undefined, { timeoutMs: 20_000 }), isCode('ERR_UNROUTABLE'));
  assert.ok(performance.now() - started < 5_000);
  // The channel stays open (a closed one would say ERR_CLIENT_CLOSED), and nothing reached the queue.
  await assert.rejects(lost.send('add', [3, 4]), isCode('ERR_UNROUTABLE'));
  assert.equal(await b.count(queue), 0);
  // The same exchange with the bound key delivers.
  const found = await client(t, exchange, 'rk');
  assert.equal(await found.send('add', [3, 4], undefined, { messageId: 'ok-1' }), 'ok-1');
  assert.equal(await b.count(queue), 1);
});

test('sendMany: 5,000 tasks in one batch, confirmed, in the queue in their order with their own options', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  const c = await client(t, exchange);
  const tasks = Array.from({ length: 5_000 }, (_, i) =>
    i % 1_000 === 0
      ? {
          func: 'echo' as const,
          args: [i],
          kwargs: { k: i },
          options: { messageId: `own-${i}`, priority: 5 },
        }
      : { func: 'add' as const, args: [i, 1] as [number, number] },
  );
  const ids = await c.sendMany(tasks, { window: 200 });
  assert.equal(ids.length, 5_000);
  assert.equal(new Set(ids).size, 5_000);
  assert.equal(ids[1_000], 'own-1000');
  // Confirmed means stored: all of them are there now, in the order given.
  const got = await b.take(queue, 5_000);
  assert.deepEqual(
    got.map((m) => m.properties.messageId),
    ids,
  );
  assert.deepEqual(JSON.parse(String(got[1]?.content)), { func: 'add', args: [1, 1] });
  assert.deepEqual(JSON.parse(String(got[2_000]?.content)), {
    func: 'echo',
    args: [2_000],
    kwargs: { k: 2_000 },
  });
  assert.equal(got[2_000]?.properties.priority, 5);
  assert.equal(got[2_000]?.properties.deliveryMode, 2);
});

test('sendMany that the broker refuses, or that a close cuts short: a SendManyError, and every task it calls confirmed is in the queue', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  const lost = await client(t, exchange, 'nobody-listens');
  const tasks = (n: number) =>
    Array.from({ length: n }, (_, i) => ({ func: 'add' as const, args: [i, 1] as [number, number] }));
  const unroutable = await lost.sendMany(tasks(50)).then(
    () => assert.fail('resolved'),
    (err: unknown) => err,
  );
  assert.ok(unroutable instanceof SendManyError);
  assert.equal(unroutable.code, 'ERR_UNROUTABLE');
  assert.equal(unroutable.confirmed.filter(Boolean).length, 0);
  assert.match(unroutable.message, /^50 of 50 tasks were not confirmed: no queue is bound/);
  assert.equal(await b.count(queue), 0);

  const c = await client(t, exchange);
  const sending = c.sendMany(tasks(50_000), { window: 50 }).then(
    () => assert.fail('resolved: the close came too late to cut the batch'),
    (err: unknown) => err,
  );
  await waitFor('a thousand in the queue', async () => (await b.count(queue)) >= 1_000, 30_000);
  await c.close();
  const cut = await sending;
  assert.ok(cut instanceof SendManyError, String(cut));
  assert.equal(cut.code, 'ERR_CLIENT_CLOSED');
  assert.match(cut.message, /tasks were not confirmed: the client is closed$/);
  const confirmed = cut.messageIds.filter((_, i) => cut.confirmed[i]);
  const arrived = new Set((await b.take(queue, confirmed.length)).map((m) => String(m.properties.messageId)));
  // A thousand in the queue: at least that many less the window were confirmed before the close.
  assert.ok(confirmed.length >= 950 && confirmed.length < 50_000, `${confirmed.length} confirmed`);
  for (const id of confirmed) assert.ok(arrived.has(id), `${id} was confirmed, and is not in the queue`);
  // Nothing after the cut was sent: what arrived is at most the confirmed and the window still out.
  assert.ok(
    arrived.size <= confirmed.length + 50,
    `${arrived.size} arrived for ${confirmed.length} confirmed`,
  );
});

test('a missing exchange rejects with the broker reason, and the client is closed after it', async (t) => {
  await broker(t);
  const c = await client(t, `${freshName(t)}.missing`);
  await assert.rejects(c.send('add', [1, 2]), (err: unknown) => {
    isCode('ERR_NOT_CONFIRMED')(err);
    assert.match((err as Error).message, /NOT_FOUND - no exchange/);
    return true;
  });
  await assert.rejects(c.send('add', [1, 2]), (err: unknown) => {
    isCode('ERR_CLIENT_CLOSED')(err);
    assert.match((err as Error).message, /NOT_FOUND/);
    return true;
  });
  await assert.rejects(c.call('add', [1, 2]), isCode('ERR_CLIENT_CLOSED'));
});

test('close rejects the calls still waiting with ERR_CLIENT_CLOSED, and later use too', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  const c = await client(t, exchange);
  const waiting = c.call('add', [1, 2], undefined, { timeoutMs: 60_000 });
  await b.take(queue, 1);
  const rejected = assert.rejects(waiting, isCode('ERR_CLIENT_CLOSED'));
  const started = performance.now();
  await c.close();
  await rejected;
  assert.ok(performance.now() - started < 30_000, 'at once, not at the 60 s timeout');
  await assert.rejects(c.send('add', [1, 2]), isCode('ERR_CLIENT_CLOSED'));
  await assert.rejects(c.call('add', [1, 2]), isCode('ERR_CLIENT_CLOSED'));
  await c.close(); // idempotent
});

test('createClient rejects when the broker cannot be reached', async () => {
  await assert.rejects(createClient({ url: 'amqp://testuser:testuser@127.0.0.1:1/' }), /ECONNREFUSED/);
});

test('a list of broker URLs: the client connects to one that answers, whichever order the shuffle gives', async (t) => {
  const b = await broker(t);
  const { exchange, queue } = await quietQueue(t, b);
  // A port nobody listens on, and a host that never answers in time, beside the real one.
  const dead = new URL(AMQP_URL);
  dead.hostname = '127.0.0.1';
  dead.port = '1';
  for (let i = 0; i < 4; i++) {
    const c = await createClient<typeof fixtures>({
      url: `${dead.toString()},${AMQP_URL}`,
      exchange,
      routingKey: 'rk',
      connectTimeoutMs: 2_000,
    });
    await c.send('add', [i, 1]);
    await c.close();
  }
  assert.equal((await b.take(queue, 4)).length, 4);
});
