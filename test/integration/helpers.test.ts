// The test plumbing itself against the real broker: a test whose connection or channel the
// broker closes fails at once with the broker's reason instead of waiting out its timeouts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GetMessage } from 'amqplib';
import { broker, freshName, waitFor } from '../support/helpers.ts';

test("a channel the broker closes fails the test's waits and helper calls at once, with the broker's reason", async (t) => {
  const b = await broker(t);
  const queue = freshName(t);
  await b.channel.assertQueue(queue, { durable: true });
  b.cleanup(queue);
  const started = performance.now();
  const reason = /the broker closed the test's channel: .*PRECONDITION_FAILED - unknown delivery tag 999/;
  const taking = assert.rejects(b.take(queue, 1, 15_000), reason); // nothing will come
  const waiting = assert.rejects(
    waitFor('something that never happens', () => false, 15_000),
    reason,
  );
  // An ack of a delivery tag this channel never had: the broker closes the channel with 406.
  b.channel.ack({ fields: { deliveryTag: 999 } } as GetMessage);
  await Promise.all([taking, waiting]);
  await assert.rejects(b.count(queue), reason, 'a later call too');
  await assert.rejects(b.send(queue, 'x'), reason);
  const ms = performance.now() - started;
  assert.ok(ms < 5_000, `failed within ${Math.round(ms)} ms, not at the 15 s timeouts`);
});

test('the next test is not failed by the previous one', async (t) => {
  const b = await broker(t);
  const queue = freshName(t);
  await b.channel.assertQueue(queue, { durable: true });
  b.cleanup(queue);
  await b.send(queue, 'x');
  assert.equal(await waitFor('the message', () => b.count(queue)), 1);
});
