// One pass over a dead-letter queue against the real broker (amqp/dead-letters.ts): what a
// pass does not act on goes back untouched, however often; on a quorum queue, which drops
// a message returned too often (20 times by default on RabbitMQ 4), nothing is lost.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { AddressList, openFirst } from '../../src/amqp/connection.ts';
import { type DeadLetter, deadLetterPass } from '../../src/amqp/dead-letters.ts';
import { AMQP_URL, broker, freshName, waitFor } from '../support/helpers.ts';

for (const queueType of ['classic', 'quorum'] as const) {
  test(`${queueType}: thirty listings return every dead letter untouched, in its place`, async (t) => {
    const b = await broker(t);
    const dlq = `${freshName(t)}.dead`;
    b.cleanup(dlq);
    await b.channel.assertQueue(dlq, {
      durable: true,
      arguments: queueType === 'quorum' ? { 'x-queue-type': 'quorum' } : {},
    });
    for (let i = 0; i < 3; i++)
      await b.send(
        dlq,
        { func: 'f', args: [i] },
        { messageId: `d${i}`, headers: { 'x-error-kind': 'failed' } },
      );
    // A quorum queue's count follows its log a moment later.
    await waitFor('the three counted', async () => (await b.count(dlq)) === 3);
    const connection = await openFirst(new AddressList([AMQP_URL]), {
      purpose: 'client',
      connectTimeoutMs: 10_000,
      logger: pino({ level: 'silent' }),
    });
    t.after(() => connection.close());
    let last: DeadLetter[] = [];
    for (let pass = 0; pass < 30; pass++) {
      // What a pass gave back by closing its channel is counted again a moment later.
      await waitFor(`all three back before pass ${pass}`, async () => (await b.count(dlq)) === 3);
      const seen: DeadLetter[] = [];
      const summary = await deadLetterPass(connection, {
        action: 'list',
        deadLetterQueue: dlq,
        exchange: '',
        workQueue: dlq,
        filter: { kind: 'failed' },
        onMatch: (letter) => seen.push(letter),
      });
      assert.equal(summary.seen, 3, `pass ${pass}: ${JSON.stringify(summary)} now ${await b.count(dlq)}`);
      last = seen;
    }
    // The last pass's letters, too, are counted again a moment after its channel closes
    // (this read at once saw 0 of 3 once in CI); a dropped letter would never come back.
    await waitFor('none dropped: all three back after the last pass', async () => (await b.count(dlq)) === 3);
    assert.deepEqual(last.map((l) => l.messageId).sort(), ['d0', 'd1', 'd2']);
  });
}
