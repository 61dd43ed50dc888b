// The client's bookkeeping against a scripted channel, for the orders of events that a
// real broker produces only now and then: a reply before the confirm of its own request,
// a return before the confirm, a nack, a channel closed under pending calls.
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { test } from 'node:test';
import type { ChannelModel, ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import { Client } from '../../../src/client/client.ts';
import { ClientError, TaskCallError } from '../../../src/errors.ts';

interface Published {
  exchange: string;
  routingKey: string;
  body: unknown;
  options: Options.Publish;
  confirm: (err: unknown) => void;
}

/** A confirm channel whose confirms, returns and replies the test hands out itself. */
class ScriptedChannel extends EventEmitter {
  readonly published: Published[] = [];
  onReply: ((m: ConsumeMessage | null) => void) | undefined;
  consumed: { queue: string; options: unknown } | undefined;
  closed = false;

  async consume(queue: string, onMessage: (m: ConsumeMessage | null) => void, options: unknown) {
    this.consumed = { queue, options };
    this.onReply = onMessage;
    return { consumerTag: 'ctag' };
  }

  publish(
    exchange: string,
    routingKey: string,
    content: Buffer,
    options: Options.Publish,
    confirm: (err: unknown) => void,
  ) {
    if (this.closed) throw new Error('Channel closed');
    this.published.push({ exchange, routingKey, body: JSON.parse(content.toString()), options, confirm });
    return true;
  }

  /** Delivers a reply to the client's reply consumer. */
  reply(correlationId: unknown, body: unknown): void {
    this.onReply?.({
      content: Buffer.from(JSON.stringify(body)),
      properties: { correlationId },
      fields: {},
    } as unknown as ConsumeMessage);
  }

  /** The broker returning a mandatory message it could not route. */
  giveBack(p: Published): void {
    this.emit('return', { content: Buffer.from(''), properties: p.options, fields: {} });
  }

  /** The broker closing the channel with an error, as amqplib reports it. */
  closeWith(message: string): void {
    this.closed = true;
    this.emit('error', new Error(message));
    for (const p of this.published) p.confirm(new Error('channel closed'));
    this.emit('close');
  }
}

function scripted(t: { after: (fn: () => unknown) => void }) {
  const channel = new ScriptedChannel();
  const connection = Object.assign(new EventEmitter(), { close: async () => {} });
  const client = new Client(
    connection as unknown as ChannelModel,
    channel as unknown as ConfirmChannel,
    'the-exchange',
    'the-key',
  );
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  t.after(() => process.off('unhandledRejection', onUnhandled));
  return { channel, client, unhandled };
}

/** Lets pending callbacks and promise reactions run, and unhandled rejections be reported. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 10));

async function published(channel: ScriptedChannel, n: number): Promise<Published> {
  // Up to 20 s: a busy machine may be slow to run the client's publish, never wrong.
  for (let i = 0; i < 2_000 && channel.published.length < n; i++) await settle();
  const p = channel.published[n - 1];
  assert.ok(p !== undefined, `publish #${n}`);
  return p;
}

test('send publishes persistent, mandatory JSON with a message id, and waits for the confirm', async (t) => {
  const { channel, client } = scripted(t);
  let done = false;
  const sent = client.send('add', [1, 2], { k: 1 }).then((id) => {
    done = true;
    return id;
  });
  const p = await published(channel, 1);
  assert.equal(p.exchange, 'the-exchange');
  assert.equal(p.routingKey, 'the-key');
  assert.deepEqual(p.body, { func: 'add', args: [1, 2], kwargs: { k: 1 } });
  assert.equal(p.options.persistent, true);
  assert.equal(p.options.mandatory, true);
  assert.equal(p.options.contentType, 'application/json');
  await settle();
  assert.equal(done, false, 'not before the confirm');
  p.confirm(null);
  assert.equal(await sent, p.options.messageId);
});

test('a reply that comes before the confirm of its own request settles the call, and nothing goes unhandled', async (t) => {
  const { channel, client, unhandled } = scripted(t);
  const failing = client.call('fail', []);
  const succeeding = client.call('add', [1, 2]);
  const first = await published(channel, 1);
  const second = await published(channel, 2);
  assert.deepEqual(channel.consumed, { queue: 'amq.rabbitmq.reply-to', options: { noAck: true } });
  assert.equal(first.options.replyTo, 'amq.rabbitmq.reply-to');
  assert.notEqual(first.options.correlationId, second.options.correlationId);
  // The answers first, the confirms a while later.
  channel.reply(first.options.correlationId, { ok: false, error: { kind: 'crashed', message: 'died' } });
  channel.reply(second.options.correlationId, { ok: true, result: 3 });
  await settle();
  first.confirm(null);
  second.confirm(null);
  await assert.rejects(failing, (err: unknown) => {
    assert.ok(err instanceof TaskCallError);
    assert.equal(err.kind, 'crashed');
    assert.equal(err.message, 'died');
    return true;
  });
  assert.equal(await succeeding, 3);
  assert.deepEqual(unhandled, []);
});

test('a returned message rejects with ERR_UNROUTABLE, though the broker acks it', async (t) => {
  const { channel, client } = scripted(t);
  const sent = client.send('add', [1, 2]);
  const p = await published(channel, 1);
  channel.giveBack(p);
  p.confirm(null);
  await assert.rejects(sent, (err: unknown) => err instanceof ClientError && err.code === 'ERR_UNROUTABLE');
  // The next one is not mistaken for it.
  const next = client.send('add', [1, 2]);
  (await published(channel, 2)).confirm(null);
  assert.equal(typeof (await next), 'string');
});

test('a nack rejects with ERR_NOT_CONFIRMED; the call waiting on it ends too', async (t) => {
  const { channel, client, unhandled } = scripted(t);
  const sent = client.send('add', [1, 2]);
  (await published(channel, 1)).confirm(new Error('message nacked'));
  await assert.rejects(
    sent,
    (err: unknown) => err instanceof ClientError && err.code === 'ERR_NOT_CONFIRMED',
  );
  const called = client.call('add', [1, 2], undefined, { timeoutMs: 60_000 });
  (await published(channel, 2)).confirm(new Error('message nacked'));
  await assert.rejects(
    called,
    (err: unknown) => err instanceof ClientError && err.code === 'ERR_NOT_CONFIRMED',
  );
  assert.deepEqual(unhandled, []);
});

test('a channel closed by the broker ends every pending call with its reason', async (t) => {
  const { channel, client, unhandled } = scripted(t);
  const confirmedCall = client.call('sleep', [10], undefined, { timeoutMs: 60_000 });
  (await published(channel, 1)).confirm(null);
  const unconfirmedCall = client.call('sleep', [10], undefined, { timeoutMs: 60_000 });
  await published(channel, 2);
  const started = performance.now();
  channel.closeWith('Channel closed by server: 406 (PRECONDITION-FAILED)');
  for (const call of [confirmedCall, unconfirmedCall]) {
    await assert.rejects(call, (err: unknown) => {
      assert.ok(err instanceof ClientError);
      assert.match(err.message, /PRECONDITION-FAILED/);
      return true;
    });
  }
  assert.ok(performance.now() - started < 30_000, 'at once, not at the 60 s timeout');
  await assert.rejects(
    client.send('add', [1, 2]),
    (err: unknown) => err instanceof ClientError && err.code === 'ERR_CLIENT_CLOSED',
  );
  assert.deepEqual(unhandled, []);
});

test('a reply consumer cancelled by the broker ends the pending calls', async (t) => {
  const { channel, client } = scripted(t);
  const call = client.call('add', [1, 2], undefined, { timeoutMs: 60_000 });
  (await published(channel, 1)).confirm(null);
  channel.onReply?.(null);
  await assert.rejects(
    call,
    (err: unknown) => err instanceof ClientError && err.code === 'ERR_CLIENT_CLOSED',
  );
});
