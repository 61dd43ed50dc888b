// The frames of one turn leave in one socket write (src/amqp/turn-writes.ts), on a real
// amqplib connection to the real broker: counted at the socket, and every frame still
// reaches the broker, within the turn that wrote it.
import assert from 'node:assert/strict';
import net, { type Socket } from 'node:net';
import { type TestContext, test } from 'node:test';
import amqp, { type Channel, type ConsumeMessage } from 'amqplib';
import pino from 'pino';
import { AckFlusher } from '../../src/amqp/ack-flusher.ts';
import { AmqpPublisher } from '../../src/amqp/publisher.ts';
import { writeTogetherThisTurn } from '../../src/amqp/turn-writes.ts';
import { createClient } from '../../src/client/client.ts';
import { AMQP_URL, type Broker, broker, freshName, waitFor } from '../support/helpers.ts';

/**
 * Counts the writes made through `target`'s write paths (one socket, or every socket
 * through their prototype): one entry per write syscall, holding its chunk count (a
 * writev for several chunks).
 */
function countWrites(target: object): { writes: number[]; restore: () => void } {
  const paths = target as {
    _write: (...a: unknown[]) => void;
    _writev: (chunks: unknown[], cb: unknown) => void;
  };
  const { _write, _writev } = paths;
  const writes: number[] = [];
  paths._write = function (this: unknown, ...a: unknown[]) {
    writes.push(1);
    _write.apply(this, a);
  };
  paths._writev = function (this: unknown, chunks: unknown[], cb: unknown) {
    writes.push(chunks.length);
    _writev.call(this, chunks, cb);
  };
  return { writes, restore: () => Object.assign(paths, { _write, _writev }) };
}

/** A connection of the test's own, and the writes its socket makes. */
async function counted(t: TestContext) {
  const connection = await amqp.connect(AMQP_URL);
  t.after(() => connection.close().catch(() => {}));
  const socket = (connection.connection as unknown as { stream: Socket }).stream;
  const { writes } = countWrites(socket);
  return { connection, socket, writes };
}

/** A fresh queue on the test's broker, deleted at teardown. */
async function freshQueue(t: TestContext): Promise<{ b: Broker; queue: string }> {
  const b = await broker(t);
  const queue = freshName(t);
  await b.channel.assertQueue(queue, { durable: true });
  b.cleanup(queue);
  return { b, queue };
}

/** A fresh queue, and a confirm channel on a counted connection with nothing counted yet. */
async function publishing(t: TestContext) {
  const { b, queue } = await freshQueue(t);
  const { connection, socket, writes } = await counted(t);
  const channel = await connection.createConfirmChannel();
  writes.length = 0;
  return { b, queue, channel, socket, writes };
}

/** After this turn's check phase and the next one's: before any timer of 1 ms could fire, on an idle loop. */
const twoTurns = () => new Promise<void>((r) => setImmediate(() => setImmediate(r)));

test('ten publishes of one turn leave in one write, all ten confirmed, and within the turn', async (t) => {
  const { b, queue, channel, socket, writes } = await publishing(t);
  const confirms: Promise<void>[] = [];
  for (let i = 0; i < 10; i++) {
    confirms.push(
      new Promise((resolve, reject) =>
        channel.sendToQueue(queue, Buffer.from(`m${i}`), {}, (err) => (err ? reject(err) : resolve())),
      ),
    );
    writeTogetherThisTurn(channel);
  }
  await twoTurns();
  assert.deepEqual(writes, [10], 'one writev of the ten frames');
  assert.equal(socket.writableLength, 0, 'nothing left in the socket: no window held them');
  await Promise.all(confirms);
  const got = await b.take(queue, 10);
  assert.deepEqual(
    got.map((m) => String(m.content)),
    Array.from({ length: 10 }, (_, i) => `m${i}`),
    'all ten, in order',
  );
});

test('without it, amqplib writes each publish on its own (what the coalescing saves)', async (t) => {
  const { queue, channel, writes } = await publishing(t);
  for (let i = 0; i < 10; i++) channel.sendToQueue(queue, Buffer.from(`m${i}`));
  await channel.waitForConfirms();
  assert.equal(writes.length, 10, `ten writes: ${JSON.stringify(writes)}`);
});

test('a lone publish goes out in its own turn, and the next turn corks afresh', async (t) => {
  const { b, queue, channel, socket, writes } = await publishing(t);
  channel.sendToQueue(queue, Buffer.from('one'));
  writeTogetherThisTurn(channel);
  await twoTurns();
  assert.deepEqual(writes, [1], 'written by the end of the turn');
  assert.equal(socket.writableCorked, 0, 'uncorked');
  for (let i = 0; i < 3; i++) {
    channel.sendToQueue(queue, Buffer.from(`next${i}`));
    writeTogetherThisTurn(channel);
  }
  await twoTurns();
  assert.deepEqual(writes, [1, 3]);
  await channel.waitForConfirms();
  assert.equal((await b.take(queue, 4)).length, 4);
});

/** A fresh queue holding `count` messages, and a channel (prefetch 100) on a counted connection. */
async function consuming(t: TestContext, count: number) {
  const { b, queue } = await freshQueue(t);
  for (let i = 0; i < count; i++) await b.send(queue, `m${i}`);
  const { connection, writes } = await counted(t);
  const channel: Channel = await connection.createChannel();
  await channel.prefetch(100);
  return { b, queue, channel, writes };
}

/** Consumes `queue` on `channel` until `count` deliveries came, each told to `flusher`. */
async function deliveredTo(
  channel: Channel,
  queue: string,
  flusher: AckFlusher,
  count: number,
): Promise<ConsumeMessage[]> {
  const delivered: ConsumeMessage[] = [];
  await channel.consume(queue, (m) => {
    if (m === null) return;
    flusher.delivered(m.fields.deliveryTag);
    delivered.push(m);
  });
  await waitFor(`the ${count} deliveries`, () => delivered.length === count);
  return delivered;
}

test("the ack flusher's frames of one flush (a multiple ack and singles) leave in one write", async (t) => {
  const { b, queue, channel, writes } = await consuming(t, 8);
  const flusher = new AckFlusher(channel, 1_000);
  t.after(() => flusher.stop());
  const delivered = await deliveredTo(channel, queue, flusher, 8);
  writes.length = 0;
  // Tags 1-3 (a multiple ack), then 5 and 7 above the unsettled 4: three frames.
  for (const i of [0, 1, 2, 4, 6]) flusher.ack((delivered[i] as ConsumeMessage).fields.deliveryTag);
  flusher.flush();
  await twoTurns();
  assert.deepEqual(writes, [3], 'one writev of the three ack frames');
  // The broker took them: closing the channel gives back only the three never acked.
  await channel.close();
  await waitFor('the unacked three back in the queue', async () => (await b.count(queue)) === 3);
});

test('acks that waited for a backlog leave in one write with their fence, which the broker answers', async (t) => {
  const { b, queue, channel, writes } = await consuming(t, 4);
  const confirmed: number[][] = [];
  const flusher = new AckFlusher(
    channel,
    1_000,
    {
      run: () => channel.prefetch(100),
      onConfirmed: (tags) => confirmed.push(tags),
      onUnanswered: () => assert.fail('the fence was answered'),
    },
    () => true, // tasks wait for a worker: acks may wait
  );
  t.after(() => flusher.stop());
  const delivered = await deliveredTo(channel, queue, flusher, 4);
  writes.length = 0;
  for (const m of delivered.slice(0, 3)) flusher.ack(m.fields.deliveryTag);
  await waitFor('the fence answered', () => confirmed.length === 1);
  assert.deepEqual(writes, [2], 'one writev: the multiple ack and the basic.qos');
  assert.deepEqual(confirmed, [[1, 2, 3]]);
  await channel.close();
  await waitFor('only the unacked one back in the queue', async () => (await b.count(queue)) === 1);
});

/** Every socket write made while `run` runs, as chunk counts: the service's own connections are not reachable from outside. */
async function socketWritesDuring(t: TestContext, run: () => Promise<void>): Promise<number[]> {
  const { writes, restore } = countWrites(net.Socket.prototype);
  t.after(restore);
  try {
    await run();
  } finally {
    restore();
  }
  return writes;
}

test("the publisher's publishes of one turn (a read of results: replies, dead letters) leave in one write", async (t) => {
  const { b, queue } = await freshQueue(t);
  const publisher = new AmqpPublisher({
    urls: [AMQP_URL],
    connectTimeoutMs: 10_000,
    logger: pino({ level: 'silent' }),
  });
  t.after(() => publisher.close());
  await publisher.publish('', queue, Buffer.from('first'), {}); // connected
  const writes = await socketWritesDuring(t, async () => {
    const all = Array.from({ length: 10 }, (_, i) => publisher.publish('', queue, Buffer.from(`m${i}`), {}));
    await Promise.all(all);
  });
  assert.ok(writes.includes(10), `the ten frames in one write: ${JSON.stringify(writes)}`);
  assert.equal((await b.take(queue, 11)).length, 11);
});

test("the client's sendMany of one turn leaves in one write", async (t) => {
  const { b, queue } = await freshQueue(t);
  const client = await createClient({ url: AMQP_URL, exchange: '', routingKey: queue });
  t.after(() => client.close());
  const writes = await socketWritesDuring(t, async () => {
    await client.sendMany(Array.from({ length: 10 }, (_, i) => ({ func: 'noop', args: [i] })));
  });
  assert.ok(writes.includes(10), `the ten messages in one write: ${JSON.stringify(writes)}`);
  assert.equal((await b.take(queue, 10)).length, 10);
});
