import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { Registry } from 'prom-client';
import { buildServer, checkBearer, type HealthReport, type HttpDeps } from '../../../src/http/server.ts';
import { createMetrics, SERVICE_METRIC_NAMES } from '../../../src/metrics/metrics.ts';

const ok: HealthReport = {
  status: 'ok',
  amqp: { connected: true, blocked: false, paused: false },
  workers: { desired: 2, up: 2, busy: 0 },
  tasksInFlight: 0,
};

function server(overrides: Partial<HttpDeps> = {}) {
  const calls: string[] = [];
  const app = buildServer({
    health: () => ok,
    status: () => ({ health: ok, workers: [], queued: 0, prefetch: 64, funcs: {} }),
    setWorkers: () => {},
    cancel: () => 'remembered',
    dead: async () => ({ letters: [], seen: 0, matched: 0, acted: 0, failed: 0, possibleDuplicates: [] }),
    registry: new Registry(),
    requestShutdown: (reason) => calls.push(reason),
    shutdownToken: 'the-token',
    logger: pino({ level: 'silent' }),
    ...overrides,
  });
  return { app, calls };
}

test('/health and /health/ready: 200 when ok, 503 with the reason otherwise; /health/live always 200', async (t) => {
  for (const status of ['ok', 'connecting', 'reconnecting', 'draining', 'workers down'] as const) {
    const report = { ...ok, status, ...(status === 'ok' ? {} : { reason: `because ${status}` }) };
    const { app } = server({ health: () => report });
    t.after(() => app.close());
    for (const url of ['/health', '/health/ready']) {
      const res = await app.inject({ method: 'GET', url });
      assert.equal(res.statusCode, status === 'ok' ? 200 : 503, `${url} when ${status}`);
      assert.deepEqual(res.json(), report);
    }
    assert.equal((await app.inject({ method: 'GET', url: '/health/live' })).statusCode, 200);
  }
});

test('/metrics: Prometheus text with every metric of the service', async (t) => {
  const registry = new Registry();
  const metrics = createMetrics(registry, {
    defaultMetrics: false,
    sources: {
      workers: () => ({ idle: 1, busy: 1 }),
      inFlight: () => 7,
      heldBytes: () => 0,
      connected: () => true,
    },
  });
  metrics.tasks.record('add', 'succeeded', 0.01);
  metrics.workerRestarts.inc({ reason: 'crash' });
  metrics.deadLettered.inc({ reason: 'failed' });
  metrics.amqpReconnects.inc();
  const { app } = server({ registry });
  t.after(() => app.close());
  const res = await app.inject({ method: 'GET', url: '/metrics' });
  assert.equal(res.statusCode, 200);
  assert.match(String(res.headers['content-type']), /^text\/plain/);
  for (const name of SERVICE_METRIC_NAMES) assert.match(res.body, new RegExp(`^# TYPE ${name} `, 'm'));
  assert.match(res.body, /^amqp_concurrency_workers\{state="busy"\} 1$/m);
  assert.match(res.body, /^amqp_concurrency_amqp_connected 1$/m);
  // Messages received and not settled, not busy workers.
  assert.match(res.body, /^amqp_concurrency_tasks_in_flight 7$/m);
});

test('POST /shutdown: 403 with no token configured, 401 without or with a wrong one, 202 once right', async (t) => {
  const off = server({ shutdownToken: undefined });
  t.after(() => off.app.close());
  const forbidden = await off.app.inject({
    method: 'POST',
    url: '/shutdown',
    headers: { authorization: 'Bearer x' },
  });
  assert.equal(forbidden.statusCode, 403);
  assert.deepEqual(off.calls, []);

  const { app, calls } = server();
  t.after(() => app.close());
  for (const authorization of [
    undefined,
    'Bearer wrong',
    'Bearer the-token-but-longer',
    'Basic the-token',
    'the-token',
  ]) {
    const res = await app.inject({
      method: 'POST',
      url: '/shutdown',
      headers: authorization ? { authorization } : {},
    });
    assert.equal(res.statusCode, 401, `${authorization}`);
    assert.equal(res.headers['www-authenticate'], 'Bearer');
  }
  assert.deepEqual(calls, []);
  const accepted = await app.inject({
    method: 'POST',
    url: '/shutdown',
    headers: { authorization: 'Bearer the-token' },
  });
  assert.equal(accepted.statusCode, 202);
  assert.deepEqual(calls, ['http']);
});

test('checkBearer', () => {
  assert.equal(checkBearer('Bearer abc', 'abc'), 'ok');
  assert.equal(checkBearer('bearer abc', 'abc'), 'ok');
  assert.equal(checkBearer('Bearer abd', 'abc'), 'denied');
  assert.equal(checkBearer('Bearer ab', 'abc'), 'denied');
  assert.equal(checkBearer(undefined, 'abc'), 'denied');
  assert.equal(checkBearer('Bearer ', 'abc'), 'denied');
  assert.equal(checkBearer('Bearer abc', undefined), 'disabled');
  assert.equal(checkBearer('Bearer abc', ''), 'disabled');
});
