// The operating routes, GET /status and PUT /workers: the bearer rules of /shutdown, the
// count's checks, and what setWorkers' errors become. Driven with inject().
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { Registry } from 'prom-client';
import {
  buildServer,
  type HealthReport,
  type HttpDeps,
  ROUTES,
  type StatusReport,
} from '../../../src/http/server.ts';

const health: HealthReport = {
  status: 'ok',
  amqp: { connected: true, blocked: false, paused: false },
  workers: { desired: 2, up: 2, busy: 1 },
  tasksInFlight: 1,
};

const report: StatusReport = {
  health,
  workers: [
    {
      pid: 101,
      state: 'busy',
      func: 'add',
      runningForMs: 1500,
      tasksDone: 7,
      held: 2,
      rssBytes: 50 * 2 ** 20,
    },
    {
      pid: 102,
      state: 'idle',
      func: undefined,
      runningForMs: undefined,
      tasksDone: 3,
      held: 0,
      rssBytes: undefined,
    },
  ],
  queued: 4,
  prefetch: 64,
  funcs: { resize: { concurrency: 2, running: 1 } },
};

const TOKEN = 'the-token';
const auth = { authorization: `Bearer ${TOKEN}` };

function server(t: { after: (fn: () => unknown) => void }, overrides: Partial<HttpDeps> = {}) {
  const sizes: number[] = [];
  let statusCalls = 0;
  const app = buildServer({
    health: () => health,
    status: () => {
      statusCalls++;
      return report;
    },
    setWorkers: (n) => {
      sizes.push(n);
    },
    cancel: (id) => (id === 'running-one' ? 'running' : 'remembered'),
    dead: async () => ({ letters: [], seen: 0, matched: 0, acted: 0, failed: 0, possibleDuplicates: [] }),
    registry: new Registry(),
    requestShutdown: () => {},
    shutdownToken: TOKEN,
    logger: pino({ level: 'silent' }),
    ...overrides,
  });
  t.after(() => app.close());
  return { app, sizes, statusCalls: () => statusCalls };
}

test('ROUTES names the operating routes, beside the old ones', () => {
  assert.deepEqual(ROUTES, {
    health: '/health',
    live: '/health/live',
    ready: '/health/ready',
    metrics: '/metrics',
    shutdown: '/shutdown',
    status: '/status',
    workers: '/workers',
    task: '/tasks/:messageId',
    dead: '/dead',
    deadReplay: '/dead/replay',
    deadPurge: '/dead/purge',
  });
});

test('GET /status answers the report, with the token only', async (t) => {
  const { app, statusCalls } = server(t);
  const ok = await app.inject({ method: 'GET', url: '/status', headers: auth });
  assert.equal(ok.statusCode, 200);
  assert.match(String(ok.headers['content-type']), /^application\/json/);
  // JSON drops the undefined fields: what is unknown is left out.
  assert.deepEqual(ok.json(), JSON.parse(JSON.stringify(report)));
  assert.equal(statusCalls(), 1);

  for (const authorization of [undefined, 'Bearer wrong', `Bearer ${TOKEN}x`, `Basic ${TOKEN}`, TOKEN]) {
    const res = await app.inject({
      method: 'GET',
      url: '/status',
      headers: authorization === undefined ? {} : { authorization },
    });
    assert.equal(res.statusCode, 401, String(authorization));
    assert.equal(res.headers['www-authenticate'], 'Bearer');
    assert.match(res.json().error, /Bearer token/);
  }
  assert.equal(statusCalls(), 1, 'the report is not even built for an unauthorised caller');
});

test('with no token configured, GET /status and PUT /workers are 403 whatever is sent', async (t) => {
  for (const shutdownToken of [undefined, '']) {
    const { app, sizes, statusCalls } = server(t, { shutdownToken });
    for (const headers of [{}, auth, { authorization: 'Bearer ' }]) {
      const status = await app.inject({ method: 'GET', url: '/status', headers });
      assert.equal(status.statusCode, 403);
      assert.match(status.json().error, /SHUTDOWN_TOKEN is not set/);
      const put = await app.inject({ method: 'PUT', url: '/workers', headers, payload: { count: 3 } });
      assert.equal(put.statusCode, 403);
    }
    assert.equal(statusCalls(), 0);
    assert.deepEqual(sizes, []);
  }
});

test('PUT /workers sets the count and answers 202 {"count": N}', async (t) => {
  const { app, sizes } = server(t);
  for (const count of [3, 1, 1000]) {
    const res = await app.inject({ method: 'PUT', url: '/workers', headers: auth, payload: { count } });
    assert.equal(res.statusCode, 202);
    assert.deepEqual(res.json(), { count });
  }
  assert.deepEqual(sizes, [3, 1, 1000]);
});

test('PUT /workers without the right token is 401 before its body is even read', async (t) => {
  const { app, sizes } = server(t);
  for (const payload of [{ count: 3 }, { count: 0 }]) {
    const res = await app.inject({ method: 'PUT', url: '/workers', payload });
    assert.equal(res.statusCode, 401);
  }
  // A body that is not JSON would be a 400 from the parser; without the token it is a 401.
  const garbage = await app.inject({
    method: 'PUT',
    url: '/workers',
    headers: { 'content-type': 'application/json', authorization: 'Bearer wrong' },
    payload: '{"count":',
  });
  assert.equal(garbage.statusCode, 401);
  assert.deepEqual(sizes, []);
});

test('PUT /workers: a count that is not a whole number of at least 1 is 400 with a clear error', async (t) => {
  const { app, sizes } = server(t);
  const bodies: unknown[] = [
    { count: 0 },
    { count: -1 },
    { count: 1.5 },
    { count: 1e300 },
    { count: '3' },
    { count: null },
    { count: [3] },
    {},
    { workers: 3 },
    [3],
    3,
    null,
  ];
  for (const body of bodies) {
    const res = await app.inject({
      method: 'PUT',
      url: '/workers',
      headers: { ...auth, 'content-type': 'application/json' },
      payload: JSON.stringify(body),
    });
    assert.equal(res.statusCode, 400, JSON.stringify(body));
    assert.match(
      res.json().error,
      /\{"count": N\} with N a whole number of at least 1/,
      JSON.stringify(body),
    );
  }
  const empty = await app.inject({ method: 'PUT', url: '/workers', headers: auth });
  assert.equal(empty.statusCode, 400);
  const notJson = await app.inject({
    method: 'PUT',
    url: '/workers',
    headers: { ...auth, 'content-type': 'application/json' },
    payload: '{"count":',
  });
  assert.equal(notJson.statusCode, 400);
  assert.deepEqual(sizes, [], 'setWorkers is never called with a bad count');
});

test("PUT /workers: setWorkers' RangeError is 400, ERR_POOL_CLOSED is 409, anything else 500", async (t) => {
  let error: Error = new RangeError('the worker count must be at least 1 (got 2)');
  const { app } = server(t, {
    setWorkers: () => {
      throw error;
    },
  });
  const put = () => app.inject({ method: 'PUT', url: '/workers', headers: auth, payload: { count: 2 } });

  const range = await put();
  assert.equal(range.statusCode, 400);
  assert.equal(range.json().error, 'the worker count must be at least 1 (got 2)');

  error = Object.assign(new Error('the pool is shutting down'), { code: 'ERR_POOL_CLOSED' });
  const draining = await put();
  assert.equal(draining.statusCode, 409);
  assert.match(draining.json().error, /draining/);

  error = new Error('something else');
  assert.equal((await put()).statusCode, 500);
});

test('the other methods on the operating routes are 404', async (t) => {
  const { app, sizes } = server(t);
  assert.equal((await app.inject({ method: 'POST', url: '/status', headers: auth })).statusCode, 404);
  assert.equal((await app.inject({ method: 'GET', url: '/workers', headers: auth })).statusCode, 404);
  assert.equal(
    (await app.inject({ method: 'POST', url: '/workers', headers: auth, payload: { count: 2 } })).statusCode,
    404,
  );
  assert.deepEqual(sizes, []);
});

test('POST /shutdown keeps its rules under the shared check', async (t) => {
  const reasons: string[] = [];
  const { app } = server(t, { requestShutdown: (reason) => reasons.push(reason) });
  assert.equal((await app.inject({ method: 'POST', url: '/shutdown' })).statusCode, 401);
  const accepted = await app.inject({ method: 'POST', url: '/shutdown', headers: auth });
  assert.equal(accepted.statusCode, 202);
  assert.deepEqual(accepted.json(), { status: 'draining' });
  assert.deepEqual(reasons, ['http']);
});

test('PUT /workers past --max-workers: 400 with the reason setWorkers gives, nothing resized', async (t) => {
  const { app } = server(t, {
    setWorkers: (n) => {
      if (n > 8) throw new RangeError(`${n} workers is over --max-workers (8)`);
    },
  });
  const res = await app.inject({
    method: 'PUT',
    url: '/workers',
    headers: { ...auth, 'content-type': 'application/json' },
    payload: JSON.stringify({ count: 1000 }),
  });
  assert.equal(res.statusCode, 400);
  assert.match(res.json().error, /1000 workers is over --max-workers \(8\)/);
});

test("POST /shutdown with an empty form body (curl -d '') is accepted; a non-empty body of another type is 415", async (t) => {
  let asked = 0;
  const { app } = server(t, { requestShutdown: () => asked++ });
  const empty = await app.inject({
    method: 'POST',
    url: '/shutdown',
    headers: { ...auth, 'content-type': 'application/x-www-form-urlencoded' },
    payload: '',
  });
  assert.equal(empty.statusCode, 202);
  assert.equal(asked, 1);
  const form = await app.inject({
    method: 'POST',
    url: '/shutdown',
    headers: { ...auth, 'content-type': 'application/xml' },
    payload: '<now/>',
  });
  assert.equal(form.statusCode, 415);
});

test('DELETE /tasks/{id}: the token first; the answer names what the cancel found; an id over 255 bytes is 400', async (t) => {
  const cancels: string[] = [];
  const { app } = server(t, {
    cancel: (id) => {
      cancels.push(id);
      return id === 'running-one' ? 'running' : 'remembered';
    },
  });
  assert.equal((await app.inject({ method: 'DELETE', url: '/tasks/running-one' })).statusCode, 401);
  const running = await app.inject({ method: 'DELETE', url: '/tasks/running-one', headers: auth });
  assert.equal(running.statusCode, 200);
  assert.deepEqual(running.json(), { messageId: 'running-one', result: 'running' });
  const encoded = await app.inject({
    method: 'DELETE',
    url: `/tasks/${encodeURIComponent('a b/c')}`,
    headers: auth,
  });
  assert.deepEqual(encoded.json(), { messageId: 'a b/c', result: 'remembered' });
  const long = await app.inject({ method: 'DELETE', url: `/tasks/${'x'.repeat(256)}`, headers: auth });
  assert.equal(long.statusCode, 400);
  assert.deepEqual(cancels, ['running-one', 'a b/c']);
});

test('the /dead routes: the token first, the filter passed on, a bad one 400, purge only with yes', async (t) => {
  const calls: [string, Record<string, unknown>][] = [];
  const answer = { letters: [], seen: 2, matched: 1, acted: 1, failed: 0, possibleDuplicates: [] };
  const { app } = server(t, {
    dead: async (action, raw) => {
      calls.push([action, raw]);
      if (raw.kind === 'nonsense') throw new RangeError('kind: must be one of failed, ...');
      if (raw.kind === 'boom') throw new Error('the broker went away');
      return answer;
    },
  });
  assert.equal((await app.inject({ method: 'GET', url: '/dead' })).statusCode, 401);
  const listed = await app.inject({ method: 'GET', url: '/dead?kind=failed&limit=3', headers: auth });
  assert.equal(listed.statusCode, 200);
  assert.deepEqual(listed.json(), answer);
  assert.deepEqual(calls[0], ['list', { kind: 'failed', limit: '3' }]);
  const bad = await app.inject({ method: 'GET', url: '/dead?kind=nonsense', headers: auth });
  assert.equal(bad.statusCode, 400);
  assert.match(bad.json().error, /^kind: must be one of/);
  assert.equal((await app.inject({ method: 'GET', url: '/dead?kind=boom', headers: auth })).statusCode, 500);
  const replay = await app.inject({
    method: 'POST',
    url: '/dead/replay',
    headers: auth,
    payload: { dryRun: true },
  });
  assert.equal(replay.statusCode, 200);
  assert.deepEqual(calls.at(-1), ['replay', { dryRun: true }]);
  const noYes = await app.inject({
    method: 'POST',
    url: '/dead/purge',
    headers: auth,
    payload: { kind: 'rejected' },
  });
  assert.equal(noYes.statusCode, 400);
  assert.match(noYes.json().error, /"yes": true/);
  const purge = await app.inject({
    method: 'POST',
    url: '/dead/purge',
    headers: auth,
    payload: { kind: 'rejected', yes: true },
  });
  assert.equal(purge.statusCode, 200);
  assert.deepEqual(calls.at(-1), ['purge', { kind: 'rejected', yes: true }]);
});
