import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ConsumeMessage } from 'amqplib';
import { attemptOf, planOutcome } from '../../src/outcome.ts';

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

const ctx = { deadLetterQueue: 'q.dead', attempt: 1, retryQueue: undefined };
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
    settle: 'ack',
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
    assert.equal(plan.settle, 'ack');
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
    settle: 'requeue',
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
