// Silence on the link under load, through the fault proxy: both ways (a partition), only
// service→broker (the broker never hears the acks, the service still hears it), only
// broker→service, and a blackhole that also swallows every new connection. Before the ack
// fences, acks written into a silent link were lost and their messages ran again (456 of
// 14,140 in the one-way case), and the silence was noticed only after the link healed.
// Each case: nothing lost, at most 0.5% run twice, noticed within 10 s, consuming again
// within 10 s of the heal. The five cases run side by side, each with its own proxy,
// queue and service: each spends most of its 17 to 29 s waiting out the silence, and one
// after another they were the longest part of a suite that CI runs on every version.
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { type FaultProxy, proxyFor } from '../support/fault-proxy.ts';
import { AMQP_URL, broker, startService, testConfig, waitFor } from '../support/helpers.ts';
import { runsFile, tally } from '../support/load.ts';

/**
 * The proxy's URL with a 5 s heartbeat: the fences must notice first (the heartbeat would
 * take 10 s, and never fires while the broker still speaks); the broker's side of a link
 * silent both ways ends after its own two missed beats, and only then gives back what it
 * had delivered into the silence.
 */
function through(proxy: FaultProxy): string {
  const url = new URL(proxy.url(AMQP_URL));
  url.searchParams.set('heartbeat', '5');
  return url.toString();
}

type Fault = 'both ways' | 'service to broker' | 'broker to service' | 'blackhole';

const SILENCE_MS = 12_000;

async function silence(t: TestContext, fault: Fault, withIds = true): Promise<void> {
  const b = await broker(t);
  const proxy = await proxyFor(t, AMQP_URL);
  const path = runsFile(t);
  const service = await startService(
    t,
    b,
    testConfig(t, { amqpUrl: through(proxy), connectTimeout: 2, workers: 2 }),
  );
  const q = service.config.queue;
  // A steady stream, straight to the broker (not through the proxy): 250 a second.
  let published = 0;
  let streaming = true;
  const stream = (async () => {
    while (streaming) {
      const batch: Promise<void>[] = [];
      for (let i = 0; i < 25; i++) {
        const id = `m${published++}`;
        batch.push(b.send(q, { func: 'record', args: [path, id, 4] }, withIds ? { messageId: id } : {}));
      }
      await Promise.all(batch);
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  t.after(async () => {
    streaming = false;
    await stream.catch(() => {});
  });
  await new Promise((r) => setTimeout(r, 3_000));

  if (fault === 'both ways') {
    proxy.silence('upstream');
    proxy.silence('downstream');
  } else if (fault === 'service to broker') proxy.silence('upstream');
  else if (fault === 'broker to service') proxy.silence('downstream');
  else proxy.blackhole();
  const cutAt = performance.now();
  await waitFor('the service to notice', () => service.health().status !== 'ok', 20_000);
  const noticedMs = performance.now() - cutAt;
  await new Promise((r) => setTimeout(r, Math.max(0, SILENCE_MS - (performance.now() - cutAt))));
  proxy.heal();
  const healedAt = performance.now();
  await waitFor('consuming again', () => service.health().status === 'ok', 30_000);
  const recoveryMs = performance.now() - healedAt;
  await new Promise((r) => setTimeout(r, 2_000));
  streaming = false;
  await stream;
  await waitFor('every message to run', () => tally(path, published).lost === 0, 60_000);
  const { duplicates } = tally(path, published);
  t.diagnostic(
    `${fault}${withIds ? '' : ', no message ids'}: noticed after ${Math.round(noticedMs)} ms, consuming ${Math.round(recoveryMs)} ms after the heal; ${published} messages, 0 lost, ${duplicates} ran twice (${((100 * duplicates) / published).toFixed(2)}%)`,
  );
  assert.ok(noticedMs <= 10_000, `noticed after ${Math.round(noticedMs)} ms`);
  assert.ok(recoveryMs <= 10_000, `consuming again ${Math.round(recoveryMs)} ms after the heal`);
  assert.ok(duplicates <= published * 0.005, `${duplicates} of ${published} ran twice`);
}

describe('silence on the link', { concurrency: true }, () => {
  for (const fault of ['both ways', 'service to broker', 'broker to service', 'blackhole'] as const) {
    test(`a ${SILENCE_MS / 1000} s silence under load, ${fault}: noticed within 10 s, back within 10 s, nothing lost, at most 0.5% twice`, async (t) => {
      await silence(t, fault);
    });
  }

  test(`a ${SILENCE_MS / 1000} s silence, service to broker, messages without ids: matched by body, at most 0.5% twice`, async (t) => {
    await silence(t, 'service to broker', false);
  });
});
