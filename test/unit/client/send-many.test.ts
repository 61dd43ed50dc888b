// sendMany's window, back-pressure and failure rules, against a channel that the test
// drives: it holds each publish's confirm until the test answers it, and says when its
// buffer is full. The real broker's side is in test/integration/client.test.ts.
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { test } from 'node:test';
import type { ChannelModel, ConfirmChannel } from 'amqplib';
import { Client } from '../../../src/client/client.ts';
import type { TaskItem } from '../../../src/client/types.ts';
import { ClientError, SendManyError } from '../../../src/errors.ts';

type Confirm = (err: unknown) => void;

/** A confirm channel whose confirms the test gives, in any order, and whose buffer fills on demand. */
class HeldChannel extends EventEmitter {
  readonly out: { id: string; confirm: Confirm }[] = [];
  published: string[] = [];
  mostOut = 0;
  /** Publishes from this many on answer "buffer full" once each. */
  fullAt = Number.POSITIVE_INFINITY;
  /** A message id amqplib cannot encode: its publish throws. */
  unencodable: string | undefined;

  publish(_exchange: string, _key: string, _content: Buffer, props: { messageId: string }, cb: Confirm) {
    if (props.messageId === this.unencodable) throw new RangeError('Frame size exceeded');
    this.published.push(props.messageId);
    this.out.push({ id: props.messageId, confirm: cb });
    this.mostOut = Math.max(this.mostOut, this.out.length);
    return this.published.length < this.fullAt;
  }

  /** Confirms (or nacks) the oldest `n` still out. */
  answer(n: number, err?: Error): void {
    for (const { confirm } of this.out.splice(0, n)) confirm(err);
  }
}

function clientOn(channel: HeldChannel): Client {
  const connection = new EventEmitter() as unknown as ChannelModel;
  return new Client(connection, channel as unknown as ConfirmChannel, 'x', 'rk');
}

const items = (n: number): TaskItem<Record<string, (...args: unknown[]) => unknown>>[] =>
  Array.from({ length: n }, (_, i) => ({ func: 'add', args: [i, 1], options: { messageId: `m${i}` } }));

/** Every test has a deadline: a batch that waits forever is the bug some of them look for. */

/** Lets every pending callback and microtask run. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** Answers every confirm as it comes, a few at a time, until `done` settles. */
async function answerAll(channel: HeldChannel, done: Promise<unknown>, batch = 7): Promise<void> {
  let finished = false;
  void done.finally(() => {
    finished = true;
  });
  while (!finished) {
    await settle();
    channel.answer(batch);
  }
}

test('sendMany keeps at most the window unconfirmed, publishes in order and resolves with the ids in order', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  const sent = clientOn(channel).sendMany(items(250), { window: 20 });
  await answerAll(channel, sent);
  assert.deepEqual(
    await sent,
    items(250).map((_, i) => `m${i}`),
  );
  assert.deepEqual(channel.published, await sent);
  assert.equal(channel.mostOut, 20, 'the window is used and never passed');
});

test('sendMany waits while the channel buffer is full and goes on at its drain', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  channel.fullAt = 3;
  const sent = clientOn(channel).sendMany(items(10), { window: 100 });
  await settle();
  assert.equal(channel.published.length, 3, 'nothing after the publish that found the buffer full');
  channel.fullAt = Number.POSITIVE_INFINITY;
  channel.emit('drain');
  await settle();
  assert.equal(channel.published.length, 10);
  channel.answer(10);
  assert.equal((await sent).length, 10);
  assert.equal(channel.listenerCount('drain'), 1, "the client's own listener only: none left behind");
});

test('a channel that closes while its buffer is full ends the batch: no wait for a drain that never comes', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  channel.fullAt = 1;
  const client = clientOn(channel);
  const sent = client.sendMany(items(5));
  await settle();
  channel.answer(1); // the one out is confirmed; the buffer stays full
  await settle();
  channel.emit('close');
  const err = await sent.then(
    () => assert.fail('resolved'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof SendManyError);
  assert.equal(err.code, 'ERR_CLIENT_CLOSED');
  assert.deepEqual(err.confirmed, [true, false, false, false, false]);
  // A closed client refuses at once, as send() does: nothing is sent.
  await assert.rejects(client.sendMany(items(1)), (e: unknown) => {
    assert.ok(e instanceof ClientError && !(e instanceof SendManyError));
    assert.equal(e.code, 'ERR_CLIENT_CLOSED');
    return true;
  });
  assert.deepEqual(channel.published, ['m0'], 'nothing after the close');
});

test('two messages of one id both returned: both unroutable, neither counted as confirmed', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  const twice = [
    { func: 'add', args: [1], options: { messageId: 'same' } },
    { func: 'add', args: [2], options: { messageId: 'same' } },
  ];
  const sent = clientOn(channel).sendMany(twice);
  await settle();
  channel.emit('return', { properties: { messageId: 'same' } });
  channel.emit('return', { properties: { messageId: 'same' } });
  channel.answer(2);
  const err = await sent.then(
    () => assert.fail('resolved'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof SendManyError);
  assert.equal(err.code, 'ERR_UNROUTABLE');
  assert.deepEqual(err.confirmed, [false, false]);
});

test('a message amqplib cannot encode fails alone as ERR_PUBLISH_REFUSED, not as a closed client', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  channel.unencodable = 'm2';
  const sent = clientOn(channel).sendMany(items(4));
  await settle();
  channel.answer(channel.out.length);
  const err = await sent.then(
    () => assert.fail('resolved'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof SendManyError);
  assert.equal(err.code, 'ERR_PUBLISH_REFUSED');
  assert.deepEqual(err.confirmed, [true, true, false, false]);
  assert.deepEqual(channel.published, ['m0', 'm1'], 'nothing after it');
});

test('after a refusal sendMany sends nothing more, waits for what is out, and says which were confirmed', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  const sent = clientOn(channel).sendMany(items(100), { window: 10 });
  await settle();
  assert.equal(channel.published.length, 10);
  channel.answer(3); // m0..m2 confirmed
  await settle();
  channel.answer(1, new Error('nacked')); // the oldest out is refused
  await settle();
  const sentBefore = channel.published.length;
  channel.answer(channel.out.length); // the rest of those out are confirmed
  const err = await sent.then(
    () => assert.fail('resolved'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof SendManyError);
  assert.equal(err.code, 'ERR_NOT_CONFIRMED');
  assert.equal(channel.published.length, sentBefore, 'nothing sent after the refusal');
  assert.equal(err.messageIds.length, 100);
  assert.equal(err.messageIds[42], 'm42');
  const refused = channel.published.indexOf('m3');
  assert.equal(err.confirmed[refused], false);
  assert.equal(err.confirmed.filter(Boolean).length, channel.published.length - 1);
  for (let i = channel.published.length; i < 100; i++) assert.equal(err.confirmed[i], false);
  assert.match(
    err.message,
    new RegExp(`^${100 - (channel.published.length - 1)} of 100 tasks were not confirmed`),
  );
});

test('sendMany checks every task before it sends one: a bad option throws and nothing goes out', {
  timeout: 10_000,
}, async () => {
  const channel = new HeldChannel();
  const batch = items(5);
  batch.push({ func: 'add', args: [1, 2], options: { priority: 300 } });
  await assert.rejects(clientOn(channel).sendMany(batch), RangeError);
  await assert.rejects(clientOn(channel).sendMany(items(2), { window: 0 }), RangeError);
  const longId = items(2);
  longId.push({ func: 'add', args: [], options: { messageId: 'x'.repeat(256) } });
  await assert.rejects(clientOn(channel).sendMany(longId), /messageId must be a string of at most 255 bytes/);
  assert.equal(channel.published.length, 0);
  assert.deepEqual(await clientOn(channel).sendMany([]), []);
});
