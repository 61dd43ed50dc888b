// The consuming connection against the real broker: the prefetch window and its changes.
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import pino from 'pino';
import { AmqpConsumer, type ConsumerOptions, type Delivery } from '../../src/amqp-consumer.ts';
import { AMQP_URL, broker, freshName, waitFor } from '../helpers.ts';

/**
 * A consumer of a fresh queue of `queueType` (with prefetch 2), started; closed and its
 * queues and exchange deleted after the test.
 */
async function startConsumer(
  t: TestContext,
  queueType: 'classic' | 'quorum',
  options: Pick<ConsumerOptions, 'logger' | 'onDelivery' | 'consumerTimeoutMs'>,
) {
  const b = await broker(t);
  const queue = freshName(t);
  b.cleanup(queue, `${queue}.dead`);
  const consumer = new AmqpConsumer({
    urls: [AMQP_URL],
    connectTimeoutMs: 10_000,
    topology: {
      exchange: `${queue}.x`,
      queue,
      routingKey: 'rk',
      queueType,
      deliveryLimit: 0,
      retryDelaysMs: [],
    },
    prefetch: 2,
    ...options,
  });
  t.after(async () => {
    await consumer.close();
    await b.channel.deleteExchange(`${queue}.x`).catch(() => {});
  });
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
  test(`a consumer timeout the broker refuses or ignores still ends in consuming (${queueType})`, async (t) => {
    const logs: string[] = [];
    const logger = pino({ level: 'warn' }, { write: (line: string) => logs.push(line) });
    const { b, consumer } = await startConsumer(t, queueType, {
      // An hour: past the broker's default, so it is asked for.
      consumerTimeoutMs: 3_600_000,
      logger,
      onDelivery: () => {},
    });
    await waitFor('consuming', () => consumer.state === 'consuming');
    const version = String(b.connection.connection.serverProperties.version);
    // 4.3.2 and later refuse it on a classic queue; 3.10 ignores it: then a warning says
    // what the broker's own setting must be.
    const warned = logs.some((l) => l.includes('consumer-timeout') && l.includes('neededMs'));
    t.diagnostic(`RabbitMQ ${version}, ${queueType}: ${warned ? 'warned' : 'taken'}`);
    const refuses = queueType === 'classic' && /^4\.(3|[4-9])\./.test(version);
    const ignores = /^3\.(10|11)\./.test(version);
    assert.equal(warned, refuses || ignores);
  });
}
