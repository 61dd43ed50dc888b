// A broker memory alarm: RabbitMQ blocks every publishing connection until it clears. The
// dead letters of failing tasks must then wait for their confirms, not give up and send
// the originals back (which made two dead letters of one message), and the consuming
// connection must keep acking. The alarm is the real one, raised with rabbitmqctl.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { test } from 'node:test';
import { faultsUnavailable, raiseMemoryAlarm } from '../support/broker-faults.ts';
import { AMQP_URL, broker, startService, testConfig, waitFor } from '../support/helpers.ts';
import { runsFile, tally } from '../support/load.ts';

const skip = await faultsUnavailable(AMQP_URL);

test('under a memory alarm, 20 failing tasks make exactly 20 dead letters once it clears', {
  skip,
}, async (t) => {
  const b = await broker(t);
  const path = runsFile(t);
  // A publish deadline far shorter than the alarm: time blocked must not count against it.
  const service = await startService(t, b, testConfig(t, { workers: 4, prefetch: 20 }), {
    publishTimeoutMs: 2_000,
  });
  const q = service.config.queue;
  const n = 20;
  // The tasks fail only once the gate opens, which is after the alarm is on.
  const gate = `${path}.gate`;
  for (let i = 0; i < n; i++)
    await b.send(q, { func: 'failAtGate', args: [path, `m${i}`, gate] }, { messageId: `m${i}` });
  const lower = await raiseMemoryAlarm();
  if (lower === undefined) {
    t.skip('the broker memory watermark is not a plain fraction');
    return;
  }
  t.after(lower);
  // The gate opens only once the service's publishing connection is blocked: a task that
  // failed between the alarm and the block reaching that connection would have its dead
  // letter confirmed at once (seen on RabbitMQ 4.0 beside a second broker: 4 of 20).
  await waitFor('publishing blocked', () => service.health().amqp.blocked, 30_000);
  writeFileSync(gate, '');
  await waitFor('every task to have run', () => tally(path, n).lost === 0, 30_000);
  // Longer than the publish deadline, with every dead letter waiting on the alarm.
  await new Promise((r) => setTimeout(r, 3_000));
  assert.equal(service.dispatcher.inFlight, n, 'each waits for its confirm, none given back');
  await lower();
  const dead: string[] = [];
  await waitFor(
    `${n} dead letters`,
    async () => {
      dead.push(...(await b.drainQueue(`${q}.dead`)).map((m) => String(m.properties.messageId)));
      return dead.length >= n && service.dispatcher.inFlight === 0;
    },
    60_000,
  );
  dead.push(...(await b.drainQueue(`${q}.dead`)).map((m) => String(m.properties.messageId)));
  const { duplicates } = tally(path, n);
  t.diagnostic(`${dead.length} dead letters for ${n} messages; ${duplicates} ran twice`);
  assert.equal(dead.length, n);
  assert.equal(new Set(dead).size, n);
  assert.equal(duplicates, 0);
  assert.equal(await b.count(q), 0);
});
