// The broker's consumer timeout set below the task time, as an operator does to catch
// stuck consumers: RabbitMQ would close the channel (up to 4.2) or cancel the consumer and
// release the delivery (4.3, quorum queues) while the task still runs. The service's
// x-consumer-timeout (queue and consumer) keeps it from firing where the broker honours it
// (4.0, 4.3); where it does not (3.10), the closure is recognised and said once, and the
// redelivery is adopted by the run under way. Either way: one run, one outcome, nothing in
// the dead-letter queue. On a quorum queue with a delivery limit, where the timeout cannot
// be lifted, each adopted redelivery is renewed (a copy with a fresh delivery count), so the
// broker never dead-letters the message that runs. Runs on every version in
// `npm run test:versions`.
import assert from 'node:assert/strict';
import { after, before, describe, type TestContext, test } from 'node:test';
import {
  faultsUnavailable,
  queueArguments,
  setGlobalConsumerTimeout,
  unackedCount,
} from '../support/broker-faults.ts';
import { AMQP_URL, freshName, startCliService, waitFor } from '../support/helpers.ts';
import { runCounts, runsFile } from '../support/load.ts';

const skip = await faultsUnavailable(AMQP_URL);
/** The broker's global timeout in these tests: well below the task's time. */
const BROKER_TIMEOUT_MS = 3_000;
const TASK_MS = 12_000;

async function oneLongTask(t: TestContext, queueType: 'classic' | 'quorum', withId: boolean): Promise<void> {
  const queue = freshName(t);
  const path = runsFile(t);
  const extra = ['--workers', '1', '--worker-timeout', '30', '--queue-type', queueType];
  if (queueType === 'quorum') extra.push('--delivery-limit', '2');
  const { b, cli } = await startCliService(t, queue, extra);
  const version = String(b.connection.connection.serverProperties.version);
  await b.send(queue, { func: 'record', args: [path, 'once', TASK_MS] }, withId ? { messageId: 'once' } : {});
  const started = performance.now();
  await waitFor('the task to succeed', () => cli.logs().some((l) => l.msg === 'task succeeded'), 60_000);
  await waitFor(
    'the queue to be settled',
    async () => {
      const q = await b.channel.checkQueue(queue);
      return q.messageCount === 0 && (await unackedCount(queue)) === 0;
    },
    30_000,
  );
  const dead = await b.channel.checkQueue(`${queue}.dead`);
  const closures = cli
    .logs()
    .filter((l) => String(l.msg).includes("the broker's consumer timeout closed the channel"));
  const args = await queueArguments(queue);
  t.diagnostic(
    `RabbitMQ ${version}, ${queueType}, ${withId ? 'with' : 'without'} an id: done in ${Math.round(performance.now() - started)} ms; ` +
      `closures said ${closures.length}; queue arguments ${args}`,
  );
  assert.deepEqual([...runCounts(path)], [['once', 1]], 'ran exactly once');
  assert.equal(dead.messageCount, 0, 'one outcome: succeeded, never also dead-lettered');
  assert.equal(cli.logs().filter((l) => l.msg === 'task succeeded').length, 1);
  assert.ok(closures.length <= 1, 'said once');
  const honours = !/^3\.(10|11)\./.test(version);
  if (!honours && queueType === 'quorum') {
    // Each closure returned it, counted towards the delivery limit: renewed, it started
    // afresh. Under load a renewal's confirm can come after the next closure has replaced
    // the delivery it renews (then it is acked unlogged, and the next one renews), so what
    // is asked is that a renewal copy was made: renewed, or its copy seen coming back.
    const story = cli
      .logs()
      .filter((l) => /redelivery|renew|consumer timeout|task succeeded/.test(String(l.msg)))
      .map((l) => `${l.time} ${l.msg}`);
    const renewals = story.filter((l) => / (adopted redelivery renewed|renewal copy of)/.test(l));
    t.diagnostic(`renewal copies: ${renewals.length}`);
    assert.ok(renewals.length >= 1, `a renewal copy was made; the service said:\n${story.join('\n')}`);
  }
  if (honours) {
    assert.equal(closures.length, 0, 'the broker honoured the timeout asked for: the channel never closed');
    const classic43 = queueType === 'classic' && /^4\.([3-9])\./.test(version);
    // 4.3 has no consumer timeout on classic queues, and refuses the argument there.
    assert.equal(/x-consumer-timeout/.test(args), !classic43, `queue arguments: ${args}`);
  }
}

// The two cases run side by side (each waits out its 12 s task), under one setting of the
// broker's global timeout: set before both and restored after both, as one test each
// setting and restoring it would restore the other's value.
describe('the broker timeout below the task time', { skip, concurrency: true }, () => {
  let restore: (() => Promise<void>) | undefined;
  before(async () => {
    restore = await setGlobalConsumerTimeout(BROKER_TIMEOUT_MS);
  });
  after(() => restore?.());

  test('the broker timeout below the task time, classic queue, no message id: one run, one outcome', (t) =>
    oneLongTask(t, 'classic', false));

  test('the broker timeout below the task time, quorum queue with a delivery limit of 2: one run, never also dead-lettered', (t) =>
    oneLongTask(t, 'quorum', true));
});
