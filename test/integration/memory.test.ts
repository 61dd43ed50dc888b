// The held-bytes budget in process, against the real broker: past it consuming pauses
// (the consumer is cancelled, its channel kept), under half of it consuming resumes, and
// every message still runs once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { collectGarbage } from '../../src/util/gc.ts';
import { broker, gate, seriesValue, startService, testConfig, waitFor } from '../support/helpers.ts';

test('past --max-held-bytes consuming pauses, and resumes under half; nothing lost, nothing twice', async (t) => {
  const b = await broker(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { workers: 1, prefetch: 20, maxMessageBytes: 1024 * 1024, maxHeldBytes: 1024 * 1024 }),
  );
  const q = service.config.queue;
  const pad = 'x'.repeat(200 * 1024);
  let paused = false;
  const watch = setInterval(() => {
    paused ||= service.consumer.paused;
  }, 5);
  t.after(() => clearInterval(watch));
  // The one worker is held at a gate while the 30 arrive, so they pile up in the master
  // however fast the machine publishes or runs them.
  const held = gate(t);
  await b.send(q, { func: 'waitAtGate', args: [held.path] });
  for (let i = 0; i < 30; i++) await b.send(q, { func: 'sleep', args: [0.02], kwargs: { pad } });
  await waitFor('consuming to pause over the budget', () => service.consumer.paused);
  held.open();
  let peak = 0;
  await waitFor('all 30 to run', async () => {
    peak = Math.max(peak, service.dispatcher.heldBytes);
    return (
      (await seriesValue(service, 'amqp_concurrency_tasks_total{func="sleep",outcome="succeeded"}')) === 30
    );
  });
  t.diagnostic(`held at most ${Math.round(peak / 1024)} KiB of a 1024 KiB budget; paused: ${paused}`);
  assert.ok(paused, 'consuming paused over the budget');
  assert.equal(service.consumer.paused, false, 'and resumed');
  assert.equal(service.dispatcher.heldBytes, 0);
  assert.equal(await b.count(q), 0);
  assert.equal(service.health().amqp.paused, false);
});

test('a garbage collection on request does not throw, with or without --expose-gc', () => {
  collectGarbage();
  collectGarbage();
});
