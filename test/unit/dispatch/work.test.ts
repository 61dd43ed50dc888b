// The keys a finished delivery is remembered under when its ack is uncertain.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ConsumeMessage } from 'amqplib';
import { bodyKey, dedupeKey, finishedKey, finishedMemo } from '../../../src/dispatch/work.ts';

const message = (content: string, messageId?: string, headers: Record<string, unknown> = {}) =>
  ({
    fields: { deliveryTag: 1, redelivered: false },
    properties: { messageId, headers },
    content: Buffer.from(content),
  }) as unknown as ConsumeMessage;

test('the memo of an acked delivery gives the key its redelivery is looked up under', () => {
  const first = message('{"func":"add"}', 'm1');
  assert.equal(finishedMemo(first), dedupeKey('m1', 1, first.content.length), 'an id: its key, at once');
  assert.equal(finishedKey(finishedMemo(first)), dedupeKey('m1', 1, first.content.length));
  // A retry copy keeps the id with a higher x-attempts: another key.
  const retry = message('{"func":"add"}', 'm1', { 'x-attempts': 2 });
  assert.equal(finishedKey(finishedMemo(retry)), dedupeKey('m1', 3, retry.content.length));
  // Without an id: the body itself, digested only when the key is asked for.
  const noId = message('{"func":"add","args":[2]}');
  assert.equal(finishedMemo(noId), noId.content);
  assert.equal(finishedKey(finishedMemo(noId)), bodyKey(noId.content));
});
