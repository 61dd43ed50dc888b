import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ConsumeMessage } from 'amqplib';
import { attemptOf, cleanedCopy, planOutcome, refusedReply } from '../../../src/dispatch/outcome.ts';

function message(properties: Partial<ConsumeMessage['properties']> = {}): ConsumeMessage {
  return {
    content: Buffer.from('{"func":"add","args":[1,2]}'),
    fields: { deliveryTag: 1, redelivered: false, exchange: 'x', routingKey: 'rk', consumerTag: 'c' },
    properties: {
      contentType: 'application/json',
      contentEncoding: undefined,
      headers: { mine: 'kept' },
      deliveryMode: 2,
      priority: undefined,
      correlationId: 'corr',
      replyTo: undefined,
      expiration: '60000',
      messageId: 'mid',
      timestamp: undefined,
      type: undefined,
      userId: 'someone-else',
      appId: undefined,
      clusterId: undefined,
      ...properties,
    },
  } as ConsumeMessage;
}

const ctx = { deadLetterQueue: 'q.dead', attempt: 1, retryQueue: undefined, now: 1_700_000_000_000 };
const failure = (outcome: 'failed' | 'timeout' | 'crashed') => ({
  outcome,
  error: { name: 'Error', message: `it ${outcome}` },
  durationMs: 5,
});

test('succeeded: acked, replied with the result when reply_to is set, never dead-lettered', () => {
  const plain = planOutcome(message(), { outcome: 'succeeded', resultJson: '3', durationMs: 1 }, ctx);
  assert.deepEqual(plain, {
    outcome: 'succeeded',
    deadLetter: undefined,
    retry: false,
    reply: undefined,
  });
  const replied = planOutcome(
    message({ replyTo: 'replies' }),
    { outcome: 'succeeded', resultJson: undefined, durationMs: 1 },
    ctx,
  );
  assert.equal(replied.reply?.routingKey, 'replies');
  assert.equal(replied.reply?.exchange, '');
  assert.equal(replied.reply?.options.correlationId, 'corr');
  assert.equal(replied.reply?.options.persistent, true, 'as durable as the request');
  assert.deepEqual(JSON.parse(String(replied.reply?.content)), { ok: true, result: null });
});

test('failed, timeout, crashed and rejected: dead-lettered with the headers, then acked', () => {
  const endings = [
    failure('failed'),
    failure('timeout'),
    failure('crashed'),
    { outcome: 'rejected' as const, reason: 'it rejected' },
  ];
  for (const ending of endings) {
    const plan = planOutcome(message({ replyTo: 'replies' }), ending, { ...ctx, attempt: 3 });
    const kind = ending.outcome;
    assert.equal(plan.outcome, kind);
    assert.equal(plan.retry, false);
    const dl = plan.deadLetter;
    assert.equal(dl?.routingKey, 'q.dead');
    assert.equal(String(dl?.content), '{"func":"add","args":[1,2]}');
    assert.deepEqual(dl?.options.headers, {
      mine: 'kept',
      'x-error-kind': kind,
      'x-error-message': `it ${kind}`,
      'x-attempts': 3,
      'x-original-routing-key': 'rk',
      'x-died-at': 1_700_000_000_000,
    });
    assert.equal(dl?.options.messageId, 'mid');
    assert.equal(dl?.options.correlationId, 'corr');
    assert.equal(dl?.options.contentType, 'application/json');
    assert.equal(dl?.options.persistent, true);
    assert.equal(dl?.options.expiration, undefined, 'a dead letter does not expire');
    assert.equal(dl?.options.userId, undefined, 'the broker would refuse another user-id');
    assert.deepEqual(JSON.parse(String(plan.reply?.content)), {
      ok: false,
      error: { kind, message: `it ${kind}` },
    });
  }
});

test('a retry goes to the TTL queue without a reply; a rejected message is never retried', () => {
  const retry = planOutcome(message({ replyTo: 'r' }), failure('crashed'), {
    ...ctx,
    retryQueue: 'q.retry.1000ms',
  });
  assert.equal(retry.retry, true);
  assert.equal(retry.deadLetter?.routingKey, 'q.retry.1000ms');
  assert.equal(retry.deadLetter?.options.headers?.['x-attempts'], 1);
  assert.equal(retry.reply, undefined, 'the caller hears once, at the end');
  const rejected = planOutcome(
    message(),
    { outcome: 'rejected', reason: 'bad' },
    { ...ctx, retryQueue: 'q.retry.1000ms' },
  );
  assert.equal(rejected.retry, false);
  assert.equal(rejected.deadLetter?.routingKey, 'q.dead');
});

test('returned: back to the queue, no outcome, nothing published', () => {
  assert.deepEqual(planOutcome(message({ replyTo: 'r' }), { outcome: 'returned', reason: 'shutdown' }, ctx), {
    outcome: undefined,
    deadLetter: undefined,
    retry: false,
    reply: undefined,
  });
});

test('a long error message is cut', () => {
  const plan = planOutcome(
    message(),
    { outcome: 'failed', error: { name: 'E', message: 'x'.repeat(5000) }, durationMs: 1 },
    ctx,
  );
  assert.ok(String(plan.deadLetter?.options.headers?.['x-error-message']).length <= 1001);
});

test('attemptOf reads our own x-attempts header, and ignores nonsense', () => {
  assert.equal(attemptOf(message({ headers: {} })), 1);
  assert.equal(attemptOf(message({ headers: { 'x-attempts': 2 } })), 3);
  assert.equal(attemptOf(message({ headers: { 'x-attempts': 'two' } })), 1);
  assert.equal(attemptOf(message({ headers: { 'x-attempts': -4 } })), 1);
  assert.equal(
    attemptOf(
      message({
        headers: { 'x-death': [{ count: 9 }] } as unknown as ConsumeMessage['properties']['headers'],
      }),
    ),
    1,
    'x-death is not ours',
  );
});

test('a header named __proto__ is a header like any other: it changes no attempt count and is copied', () => {
  // amqplib decodes a table by assignment: a table under "__proto__" becomes the prototype.
  const headers: Record<string, unknown> = {};
  Object.setPrototypeOf(headers, { 'x-attempts': 7, 'x-original-routing-key': 'forged' });
  const msg = message({ headers });
  assert.equal(attemptOf(msg), 1, 'x-attempts read from the prototype would make this attempt 8');
  const plan = planOutcome(msg, failure('failed'), ctx);
  const copied = plan.deadLetter?.options.headers as Record<string, unknown>;
  assert.equal(copied['x-original-routing-key'], 'rk');
  assert.ok(Object.hasOwn(copied, '__proto__'), "the producer's __proto__ header is kept as a header");
  assert.deepEqual(Object.getOwnPropertyDescriptor(copied, '__proto__')?.value, {
    'x-attempts': 7,
    'x-original-routing-key': 'forged',
  });
  assert.equal(Object.getPrototypeOf(copied), Object.prototype);
});

test("a cleaned copy keeps only the service's headers and says what it dropped; a refused reply becomes an error", () => {
  const plan = planOutcome(
    message({ headers: { huge: 'x'.repeat(70_000), other: 1 } }),
    failure('failed'),
    ctx,
  );
  const copy = cleanedCopy(
    plan.deadLetter as NonNullable<typeof plan.deadLetter>,
    'it cannot be encoded: out of space',
  );
  const headers = copy.options.headers as Record<string, unknown>;
  assert.deepEqual(Object.keys(headers).sort(), [
    'x-attempts',
    'x-died-at',
    'x-error-kind',
    'x-error-message',
    'x-headers-dropped',
    'x-original-routing-key',
  ]);
  assert.equal(headers['x-headers-dropped'], 2);
  assert.match(
    String(headers['x-error-message']),
    /^it failed; the original's headers could not be copied \(2 dropped: it cannot be encoded/,
  );
  assert.equal(copy.options.messageId, 'mid');
  assert.equal(copy.content, plan.deadLetter?.content);
  const replied = planOutcome(
    message({ replyTo: 'r' }),
    { outcome: 'succeeded', resultJson: '1', durationMs: 1 },
    ctx,
  );
  const error = refusedReply(
    replied.reply as NonNullable<typeof replied.reply>,
    'message size 200 is larger than max size 100',
  );
  assert.deepEqual(JSON.parse(error.content.toString()), {
    ok: false,
    error: {
      kind: 'failed',
      message: 'the reply could not be published: message size 200 is larger than max size 100',
    },
  });
  assert.equal(error.options.correlationId, 'corr');
});
