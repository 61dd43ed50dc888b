// The consuming connection against the real broker: the prefetch window and its changes.
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import pino from 'pino';
import { AddressList } from '../../src/amqp/connection.ts';
import { AmqpConsumer, type ConsumerOptions } from '../../src/amqp/consumer.ts';
import type { Delivery } from '../../src/amqp/delivery.ts';
import { proxyFor } from '../support/fault-proxy.ts';
import { AMQP_URL, broker, deleteExchangesAfter, freshName, waitFor } from '../support/helpers.ts';

/**
 * A consumer of a fresh queue of `queueType` (with prefetch 2), started; closed and its
 * queues and exchange deleted after the test.
 */
async function startConsumer(
  t: TestContext,
  queueType: 'classic' | 'quorum',
  {
    consumerTimeoutMs,
    ...options
  }: Pick<ConsumerOptions, 'logger' | 'onDelivery'> &
    Partial<Pick<ConsumerOptions, 'addresses' | 'urls' | 'reconnect'>> & { consumerTimeoutMs?: number },
) {
  // Closed before the broker helper deletes its queue (hooks run in the order registered):
  // a consumer that sees its queue deleted declares it again, and it would stay behind.
  let consumer: AmqpConsumer | undefined;
  t.after(() => consumer?.close());
  const b = await broker(t);
  const queue = freshName(t);
  b.cleanup(queue, `${queue}.dead`);
  consumer = new AmqpConsumer({
    urls: [AMQP_URL],
    connectTimeoutMs: 10_000,
    topology: {
      exchange: `${queue}.x`,
      queue,
      routingKey: 'rk',
      queueType,
      deliveryLimit: 0,
      retryDelaysMs: [],
      ...(consumerTimeoutMs === undefined ? {} : { consumerTimeoutMs }),
    },
    prefetch: 2,
    ...options,
  });
  deleteExchangesAfter(t, `${queue}.x`);
  consumer.start();
  return { b, queue, consumer };
}

for (const queueType of ['classic', 'quorum'] as const) {
  test(`a prefetch change binds the live consumer at once, and nothing in flight is lost (${queueType})`, async (t) => {
    const held: Delivery[] = [];
    const { b, queue, consumer } = await startConsumer(t, queueType, {
      logger: pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' }),
      onDelivery: (delivery) => held.push(delivery),
    });
    await waitFor('consuming', () => consumer.state === 'consuming');
    for (let i = 0; i < 10; i++) await b.send(queue, { func: 'add', args: [i, 0] });
    await waitFor('two deliveries', () => held.length === 2);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(held.length, 2, 'the window holds two');

    // The new consumer's window is six of its own; the two the old one holds stay until settled.
    await consumer.setPrefetch(6);
    await waitFor('six more deliveries', () => held.length === 8);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(held.length, 8, 'six for the new window, not more');

    // Deliveries of the replaced consumer are settled on the same channel like the rest.
    for (const d of held.splice(0)) assert.equal(consumer.ack(d), true);
    await waitFor('the last two', () => held.length === 2);
    for (const d of held.splice(0)) consumer.ack(d);
    await waitFor('every message acked', async () => {
      const q = await b.channel.checkQueue(queue);
      return q.messageCount === 0 && q.consumerCount === 1;
    });
    assert.equal(held.length, 0);
  });
}

for (const queueType of ['classic', 'quorum'] as const) {
  test(`a consumer timeout the broker ignores still ends in consuming, with a warning (${queueType})`, async (t) => {
    const logs: string[] = [];
    const logger = pino({ level: 'warn' }, { write: (line: string) => logs.push(line) });
    const { b, consumer } = await startConsumer(t, queueType, {
      // An hour: past the broker's default, so that a broker which ignores it is worth a warning.
      consumerTimeoutMs: 3_600_000,
      logger,
      onDelivery: () => {},
    });
    await waitFor('consuming', () => consumer.state === 'consuming');
    const version = String(b.connection.connection.serverProperties.version);
    // 3.10 ignores it: a warning says what the broker's own setting must be. 4.3 refuses it
    // on a classic queue, which no longer times out there: it is not sent, nothing to say.
    const warned = logs.some((l) => l.includes('consumer-timeout') && l.includes('neededMs'));
    t.diagnostic(`RabbitMQ ${version}, ${queueType}: ${warned ? 'warned' : 'taken'}`);
    assert.equal(warned, /^3\.(10|11)\./.test(version));
  });
}

test("the queue deleted under the consumer: from the broker's cancel on, its deliveries are not settled (no throw), and it consumes again", async (t) => {
  // Every write on a connection that has begun to close throws in amqplib. The close after
  // the broker's cancel takes a round trip, held 200 ms each way by the proxy: acks and
  // requeues made in it must be refused by the consumer, not thrown (a throw from the ack
  // timer ended the process).
  const proxy = await proxyFor(t, AMQP_URL);
  const held: Delivery[] = [];
  const inWindow: { acked?: boolean; requeued?: boolean; threw?: unknown } = {};
  const logger = pino(
    { level: 'warn' },
    {
      write: (line: string) => {
        // The moment the consumer hears the cancel; the next turn is inside the close.
        if (line.includes('the broker cancelled the consumer'))
          setImmediate(() => {
            try {
              inWindow.acked = consumer.ack(held[0] as Delivery);
              inWindow.requeued = consumer.requeue(held[1] as Delivery);
            } catch (err) {
              inWindow.threw = err;
            }
          });
      },
    },
  );
  const { b, queue, consumer } = await startConsumer(t, 'classic', {
    urls: [proxy.url(AMQP_URL)],
    logger,
    onDelivery: (delivery) => held.push(delivery),
  });
  await waitFor('consuming', () => consumer.state === 'consuming');
  for (let i = 0; i < 4; i++) await b.send(queue, { func: 'add', args: [i, 0] });
  await waitFor('two deliveries', () => held.length === 2);
  const states: string[] = [];
  consumer.on('state', (state) => states.push(state));
  proxy.latency(200);
  await b.channel.deleteQueue(queue);
  await waitFor('the consumer to act in the close', () => 'acked' in inWindow || 'threw' in inWindow);
  assert.equal(inWindow.threw, undefined, 'no throw');
  assert.deepEqual(inWindow, { acked: false, requeued: false }, 'neither settled on the closing session');
  // (Before, the session stayed live until the close was done: the requeue threw, and the
  // ack was taken and thrown from the flush timer, which ends a process.)
  proxy.latency(0);
  await waitFor('a new session', () => states.join() === 'reconnecting,consuming', 30_000);
  // The queue is declared again by the new session, and what is sent now is delivered.
  await b.send(queue, { func: 'add', args: [9, 0] });
  await waitFor('the new message', () => held.length === 3, 30_000);
  assert.equal(consumer.ack(held[2] as Delivery), true);
  // Before the proxy closes at teardown: a close through a dead link would wait its deadline.
  await consumer.close();
});

test('a quorum queue declared before with another x-consumer-timeout is taken as it is, and said once', async (t) => {
  const b = await broker(t);
  const queue = freshName(t);
  b.cleanup(queue, `${queue}.dead`);
  deleteExchangesAfter(t, `${queue}.x`);
  const consumerWith = (consumerTimeoutMs: number, lines: string[]) => {
    const consumer: AmqpConsumer = new AmqpConsumer({
      urls: [AMQP_URL],
      connectTimeoutMs: 10_000,
      topology: {
        exchange: `${queue}.x`,
        queue,
        routingKey: 'rk',
        queueType: 'quorum',
        deliveryLimit: 5,
        retryDelaysMs: [],
        consumerTimeoutMs,
      },
      prefetch: 2,
      logger: pino({ level: 'info' }, { write: (line: string) => lines.push(line) }),
      onDelivery: (d) => consumer.ack(d),
    });
    t.after(() => consumer.close());
    consumer.start();
    return consumer;
  };
  // An earlier deployment, with another --worker-timeout: 4.3 compares this argument both ways.
  const earlier = consumerWith(600_000, []);
  await waitFor('the earlier one consuming', () => earlier.state === 'consuming');
  await earlier.close();
  const lines: string[] = [];
  const consumer = consumerWith(900_000, lines);
  await waitFor('consuming', () => consumer.state === 'consuming');
  await b.channel.publish(`${queue}.x`, 'rk', Buffer.from('{"func":"add","args":[1,2]}'));
  await waitFor('the message acked', async () => (await b.channel.checkQueue(queue)).messageCount === 0);
  const version = String(b.connection.connection.serverProperties.version);
  const kept = lines.filter((l) => l.includes('keeps the x-consumer-timeout'));
  t.diagnostic(`RabbitMQ ${version}: ${kept.length === 1 ? 'kept, said once' : 'declared'}`);
  // 4.0 takes any value on a redeclare; 3.10 is not sent one; 4.3 refuses a different one.
  assert.equal(kept.length, /^4\.([3-9])\./.test(version) ? 1 : 0);
});

/** A logger whose lines a test can read. */
function memoryLogger() {
  const lines: { level: number; msg: string }[] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => lines.push(JSON.parse(line)) });
  return { logger, lines };
}

/** The URL of AMQP_URL's broker with a user the broker does not know. */
function unknownUser(): string {
  const url = new URL(AMQP_URL);
  url.username = 'no-such-user';
  url.password = 'wrong';
  return url.toString();
}

test('no URL given: a refused default account moves on to the next at once, and the one that works is kept', async (t) => {
  const { logger, lines } = memoryLogger();
  const addresses = AddressList.accounts([unknownUser(), AMQP_URL]);
  const { consumer } = await startConsumer(t, 'classic', { logger, onDelivery: () => {}, addresses });
  await waitFor('consuming through the second account', () => consumer.state === 'consuming');
  assert.equal(consumer.broker, new URL(AMQP_URL).toString().replace(/:[^:@/]*@/, ':***@'));
  assert.equal(
    lines.filter((l) => l.msg.includes('refused the login of no-such-user; trying the next')).length,
    1,
  );
  assert.equal(lines.filter((l) => l.level >= 50).length, 0, 'no error line');
  assert.equal(addresses.next(), AMQP_URL, 'the account that worked is the one tried next');
});

test('a refused login on a URL the user gave is one clear line, then quiet retries with backoff', async (t) => {
  const { logger, lines } = memoryLogger();
  const { consumer } = await startConsumer(t, 'classic', {
    logger,
    onDelivery: () => {},
    urls: [unknownUser()],
    reconnect: { initialMs: 10, maxMs: 40 },
  });
  await waitFor(
    'a few refused logins',
    () => lines.filter((l) => l.msg === 'login refused again').length >= 3,
  );
  const loud = lines.filter((l) => l.level >= 40);
  assert.equal(loud.length, 1, JSON.stringify(loud));
  assert.match(
    loud[0]?.msg ?? '',
    /refused the login of no-such-user: check the user and password in --amqp-url/,
  );
  assert.equal(consumer.state, 'connecting');
});
