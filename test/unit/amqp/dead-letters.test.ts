// The pure parts of the dead-letter passes: the filter (as the CLI and HTTP give it), what
// a listing shows of a dead letter, which match, and the replayed copy.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GetMessage } from 'amqplib';
import { readOrder } from '../../../src/amqp/control.ts';
import { matches, parseDeadFilter, parseDuration } from '../../../src/amqp/dead-filter.ts';
import { describeDeadLetter, replayCopy } from '../../../src/amqp/dead-letters.ts';

function deadLetter(headers: Record<string, unknown>, properties: Record<string, unknown> = {}): GetMessage {
  return {
    content: Buffer.from('{"func":"resize","args":[1]}'),
    fields: { deliveryTag: 1, redelivered: false, exchange: '', routingKey: 'q.dead', messageCount: 0 },
    properties: {
      headers,
      messageId: 'm1',
      userId: 'guest',
      deliveryMode: 2,
      contentType: 'application/json',
      ...properties,
    },
  } as unknown as GetMessage;
}

test('the filter: kinds, func, limit and a duration, each wrong one in one line', () => {
  assert.deepEqual(parseDeadFilter({}), {});
  assert.deepEqual(parseDeadFilter({ kind: 'failed', func: 'f', limit: '3', olderThan: '2h' }), {
    kind: 'failed',
    func: 'f',
    limit: 3,
    olderThanMs: 7_200_000,
  });
  assert.match(String(parseDeadFilter({ kind: 'oops' })), /^--kind: must be one of failed, timeout/);
  assert.match(String(parseDeadFilter({ func: '' })), /^--func: must be a function name/);
  assert.match(String(parseDeadFilter({ limit: '1.5' })), /^--limit: must be a whole number/);
  assert.match(String(parseDeadFilter({ limit: 0 })), /^--limit: must be a whole number/);
  assert.match(String(parseDeadFilter({ olderThan: 'soon' })), /^--older-than: must be a duration/);
  assert.deepEqual(['500ms', '45s', '30m', '1.5h', '7d', 'x'].map(parseDuration), [
    500,
    45_000,
    1_800_000,
    5_400_000,
    604_800_000,
    undefined,
  ]);
});

test('a listing: id, func, kind, error, attempts, when it died and the routing key; never the body unless asked', () => {
  const m = deadLetter({
    'x-error-kind': 'failed',
    'x-error-message': 'boom',
    'x-attempts': 2,
    'x-died-at': 1_000,
    'x-original-routing-key': 'rk',
  });
  assert.deepEqual(describeDeadLetter(m, false), {
    messageId: 'm1',
    func: 'resize',
    kind: 'failed',
    error: 'boom',
    attempts: 2,
    diedAt: 1_000,
    routingKey: 'rk',
    replayed: 0,
  });
  assert.equal(describeDeadLetter(m, true).body, '{"func":"resize","args":[1]}');
  // Dead-lettered by the broker itself (a delivery limit): the key x-death recorded.
  const byBroker = describeDeadLetter(
    deadLetter({ 'x-death': [{ 'routing-keys': ['orders'] }] }, { timestamp: 5 }),
    false,
  );
  assert.equal(byBroker.routingKey, 'orders');
  assert.equal(byBroker.diedAt, 5_000, 'the publish time when it carries no x-died-at');
  const notJson = { ...deadLetter({}), content: Buffer.from('not json') } as GetMessage;
  assert.equal(describeDeadLetter(notJson, false).func, undefined);
  const letter = describeDeadLetter(m, false);
  assert.ok(matches(letter, { kind: 'failed', func: 'resize', olderThanMs: 500 }, 2_000));
  assert.ok(!matches(letter, { kind: 'rejected' }, 2_000));
  assert.ok(!matches(letter, { func: 'other' }, 2_000));
  assert.ok(!matches(letter, { olderThanMs: 5_000 }, 2_000));
});

test('a replayed copy: death headers gone, x-replayed counted, the routing key kept, never user-id', () => {
  const m = deadLetter({
    'x-error-kind': 'failed',
    'x-error-message': 'boom',
    'x-attempts': 3,
    'x-died-at': 1,
    'x-delay-until': 9,
    'x-original-routing-key': 'rk',
    'x-replayed': 1,
    mine: 'kept',
  });
  const copy = replayCopy(m, describeDeadLetter(m, false));
  assert.equal(copy.routingKey, 'rk');
  assert.deepEqual(copy.options.headers, { mine: 'kept', 'x-replayed': 2 });
  assert.equal(copy.options.messageId, 'm1');
  assert.equal(copy.options.userId, undefined);
  assert.equal(copy.options.persistent, true);
  assert.equal(copy.options.mandatory, true);
});

test('a control order: a cancel with a message id; a reply_to that would close our channel is dropped', () => {
  const order = (body: string, properties: Record<string, unknown> = {}) =>
    readOrder({ content: Buffer.from(body), properties: { headers: {}, ...properties } } as never);
  assert.deepEqual(
    order('{"cancel":"m1"}', { replyTo: 'answers', correlationId: 'c', headers: { 'x-origin': 'me' } }),
    {
      cancel: 'm1',
      origin: 'me',
      replyTo: 'answers',
      correlationId: 'c',
    },
  );
  assert.equal(order('{"cancel":"m1"}', { replyTo: 'amq.rabbitmq.reply-to' })?.replyTo, undefined);
  assert.equal(order('{"cancel":"m1"}', { replyTo: 'x'.repeat(256) })?.replyTo, undefined);
  for (const bad of [
    'not json',
    '{}',
    '{"cancel":5}',
    '{"cancel":""}',
    'null',
    `{"cancel":"${'x'.repeat(256)}"}`,
  ])
    assert.equal(order(bad), undefined, bad);
  assert.equal(order('x'.repeat(5000)), undefined);
});
