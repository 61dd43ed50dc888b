// What a consuming session keeps of the deliveries it acked until a fence proves the acks.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Channel, ConsumeMessage } from 'amqplib';
import type { BrokerConnection } from '../../../src/amqp/connection.ts';
import { ConsumerSession } from '../../../src/amqp/session.ts';

const message = (tag: number, messageId?: string) =>
  ({
    fields: { deliveryTag: tag },
    properties: { messageId, headers: {} },
    content: Buffer.from(`body ${tag}`),
  }) as unknown as ConsumeMessage;

const channel = { ack: () => {} } as unknown as Channel;
const connection = {} as BrokerConnection;
const later = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

test('an acked delivery is kept as its memo, not as the message, until a fence answers', async (t) => {
  let answer: (() => void) | undefined;
  const session = new ConsumerSession(connection, channel, 1, {
    run: () =>
      new Promise<void>((resolve) => {
        answer = resolve;
      }),
    onUnanswered: () => {},
    memo: (m) => m.properties.messageId ?? m.content,
  });
  t.after(() => session.drop());
  const withId = message(1, 'm1');
  const noId = message(2);
  session.acks.delivered(1);
  session.acks.delivered(2);
  session.ack(withId);
  session.ack(noId);
  // Neither message is held: the id, and the body (the same Buffer, not a copy).
  assert.deepEqual(session.uncertain, ['m1', noId.content]);
  assert.equal(session.uncertain[1], noId.content);
  // The flush, then the fence: waited for, not timed (a busy machine is late).
  const ceiling = performance.now() + 20_000;
  while (answer === undefined) {
    assert.ok(performance.now() < ceiling, 'a fence within 20 s');
    await later(2);
  }
  assert.equal(session.uncertain.length, 2, 'written, the fence unanswered: still kept');
  answer();
  await later(0);
  assert.deepEqual(session.uncertain, [], 'the answered fence proves both');
});

test('without a memo nothing is kept', () => {
  const session = new ConsumerSession(connection, channel, 1, {
    run: async () => {},
    onUnanswered: () => {},
  });
  session.acks.delivered(1);
  session.ack(message(1, 'm1'));
  assert.deepEqual(session.uncertain, []);
  session.drop();
});
