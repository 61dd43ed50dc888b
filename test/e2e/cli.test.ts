// The CLI as a user runs it: a real process, real broker, real signals and exit codes.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { type TestContext, test } from 'node:test';
import { credentialsOf } from '../support/broker-url.ts';
import {
  AMQP_URL,
  alive,
  broker,
  CLI,
  cliArgs,
  deleteExchangesAfter,
  freshName,
  gate,
  getJson,
  ROOT,
  seriesAt,
  spawnCli,
  startCliService,
  waitFor,
} from '../support/helpers.ts';

/** Waits until the service logs that a task of `func` started... by watching the pool become busy. */
async function waitBusy(port: number, busy: number): Promise<void> {
  await waitFor(`${busy} busy workers`, async () => {
    const { body } = await getJson(port, '/health');
    return (body.workers as { busy: number }).busy === busy;
  });
}

function run(args: string[], env: Record<string, string> = {}) {
  try {
    const stdout = execFileSync(process.execPath, [CLI, ...args], {
      cwd: ROOT,
      env: { ...process.env, ...env },
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 20_000,
    });
    return { code: 0, stdout, stderr: '' };
  } catch (err) {
    const e = err as { status: number; stdout: string; stderr: string };
    return { code: e.status, stdout: e.stdout, stderr: e.stderr };
  }
}

test('a bad flag gives one line naming it and exit code 2', () => {
  const cases: [string[], RegExp][] = [
    [['--workers', '0'], /^amqp-concurrency: --workers: must be a whole number of at least 1/],
    [['--bogus'], /^amqp-concurrency: --bogus: unknown option/],
    [
      ['--amqp_url', 'http://user:hunter2@host/'],
      /^amqp-concurrency: --amqp_url: must be an amqp:\/\/ or amqps:\/\/ URL/,
    ],
    [['--worker-timeout', 'soon'], /^amqp-concurrency: --worker-timeout: must be a number of seconds/],
    [['--task-path', 'no/such/module'], /^amqp-concurrency: --task-path: no file, folder or package/],
    [['--http-port'], /^amqp-concurrency: --http-port: needs a value/],
  ];
  for (const [args, pattern] of cases) {
    const { code, stderr } = run(args);
    assert.equal(code, 2, `${args.join(' ')} exits 2`);
    assert.match(stderr, pattern);
    assert.equal(stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line`);
    assert.doesNotMatch(stderr, /hunter2/, 'no password in the error');
  }
  const env = run([], { WORKERS: 'many' });
  assert.equal(env.code, 2);
  assert.match(env.stderr, /WORKERS: must be a whole number/);
});

test('--help and --version answer and exit 0', () => {
  const help = run(['--help']);
  assert.equal(help.code, 0);
  for (const flag of [
    '--workers',
    '--task-path',
    '--worker-timeout',
    '--amqp-url',
    '--prefetch',
    '--shutdown-timeout',
  ]) {
    assert.ok(help.stdout.includes(flag), `--help lists ${flag}`);
  }
  const version = run(['--version']);
  assert.equal(version.code, 0);
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
  assert.equal(version.stdout.trim(), pkg.version);
});

test('a task module that cannot load stops start-up with exit 2 and its error', async (t) => {
  const queue = freshName(t);
  const cli = spawnCli(t, [
    ...cliArgs(queue),
    '--task-path',
    'test/fixtures/broken-tasks.ts',
    '--workers',
    '2',
  ]);
  const { code } = await cli.exit;
  assert.equal(code, 2);
  assert.match(cli.stderr(), /cannot load the task module .*broken-tasks\.ts: broken on purpose/);
  assert.match(cli.stderr(), /at .*broken-tasks\.ts/, 'the module error shows where');
});

test('a queue declared otherwise ends start-up with exit 2 and a hint', async (t) => {
  const b = await broker(t);
  const queue = freshName(t);
  b.cleanup(queue, `${queue}.dead`);
  // Not the old non-durable queue: RabbitMQ 4 deprecates transient non-exclusive queues (and
  // will refuse them). A durable one with an argument the service does not declare clashes too.
  await b.channel.assertQueue(queue, { durable: true, arguments: { 'x-max-length': 1000 } });
  deleteExchangesAfter(t, `${queue}.x`);
  const cli = spawnCli(t, cliArgs(queue));
  const { code } = await cli.exit;
  assert.equal(code, 2);
  assert.match(cli.stderr(), /queue ".*" exists with other settings.*delete it once/);
  assert.doesNotMatch(cli.stderr(), /^\s+at /m, 'no stack trace');
});

test('SIGTERM drains: running tasks finish and are acked, the rest go back, exit 0', async (t) => {
  const queue = freshName(t);
  const token = 'drain-token';
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '1', '--prefetch', '10'], {
    SHUTDOWN_TOKEN: token,
  });
  const replies = await b.channel.assertQueue('', { exclusive: true });
  // The running task holds until the test opens its gate: the drain is a state the test
  // looks at, not a race against a task of fixed length.
  const running = gate(t);
  await b.send(
    queue,
    { func: 'waitAtGate', args: [running.path] },
    { replyTo: replies.queue, correlationId: 'running' },
  );
  for (let i = 0; i < 5; i++)
    await b.send(queue, { func: 'add', args: [i, 0] }, { messageId: `waiting-${i}` });
  await waitBusy(port, 1);
  cli.child.kill('SIGTERM');
  // /health turns 503 as soon as the signal is handled, before the running task ends.
  const during = await waitFor('/health to say draining', async () => {
    const h = await getJson(port, '/health');
    return h.status === 503 ? h : undefined;
  });
  assert.equal(during.body.status, 'draining');
  // Whatever the worker held next has come back to the master before the running task may
  // end (whether it held one depends on timing; network-faults.test.ts makes sure of it).
  await waitFor('the held task asked back', async () => {
    const res = await fetch(`http://127.0.0.1:${port}/status`, {
      headers: { authorization: `Bearer ${token}` },
    });
    const status = (await res.json()) as { workers: { held: number }[] };
    return status.workers[0]?.held === 1;
  });
  running.open();
  const { code } = await cli.exit;
  assert.equal(code, 0);
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 'opened' });
  // Given back before the exit, but the broker puts a nacked message back in its queue a
  // moment after it has read the nack: wait for the five, do not read the queue once.
  const back = await b.take(queue, 5);
  assert.deepEqual(
    back.map((m) => m.properties.messageId).sort(),
    [0, 1, 2, 3, 4].map((i) => `waiting-${i}`),
  );
  assert.equal(await b.count(`${queue}.dead`), 0);
});

test('a task still running at the shutdown deadline is killed and its message goes back', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '1', '--shutdown-timeout', '0.5']);
  await b.send(queue, { func: 'sleep', args: [30] }, { messageId: 'long' });
  await waitBusy(port, 1);
  cli.child.kill('SIGTERM');
  const { code } = await cli.exit;
  assert.equal(code, 0);
  const back = await b.take(queue, 1);
  assert.deepEqual(
    back.map((m) => [m.properties.messageId, m.fields.redelivered]),
    [['long', true]],
  );
  assert.equal(await b.count(`${queue}.dead`), 0);
});

test('a second signal stops at once; the broker requeues what was not acked', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '1', '--shutdown-timeout', '60']);
  await b.send(queue, { func: 'sleep', args: [60] }, { messageId: 'long' });
  await waitBusy(port, 1);
  cli.child.kill('SIGINT');
  await waitFor(
    'the drain to start',
    async () => (await getJson(port, '/health')).body.status === 'draining',
  );
  cli.child.kill('SIGINT');
  const { code } = await cli.exit;
  assert.notEqual(code, 0);
  const back = await b.take(queue, 1);
  assert.equal(back[0]?.properties.messageId, 'long');
});

test('POST /shutdown: 403 without a token configured, 401 with a wrong one, 202 and a drain with the right one', async (t) => {
  const plain = await startCliService(t, freshName(t));
  const forbidden = await fetch(`http://127.0.0.1:${plain.port}/shutdown`, {
    method: 'POST',
    headers: { authorization: 'Bearer anything' },
  });
  assert.equal(forbidden.status, 403);
  assert.equal((await getJson(plain.port, '/health')).status, 200, 'still serving');

  const queue = freshName(t);
  const { cli, port } = await startCliService(t, queue, [], { SHUTDOWN_TOKEN: 's3cret-token' });
  const url = `http://127.0.0.1:${port}/shutdown`;
  assert.equal((await fetch(url, { method: 'POST' })).status, 401);
  assert.equal(
    (await fetch(url, { method: 'POST', headers: { authorization: 'Bearer wrong' } })).status,
    401,
  );
  assert.equal((await getJson(port, '/health')).status, 200, 'a refused request does not drain');
  const ok = await fetch(url, { method: 'POST', headers: { authorization: 'Bearer s3cret-token' } });
  assert.equal(ok.status, 202);
  const { code } = await cli.exit;
  assert.equal(code, 0);
  assert.doesNotMatch(cli.stdout(), /s3cret-token/, 'the token is never logged');
  assert.ok(!cli.stdout().includes(credentialsOf(AMQP_URL)), 'the password is never logged');
});

function childrenOf(pid: number): number[] {
  const out = execFileSync('ps', ['-o', 'pid=', '--ppid', String(pid)], { encoding: 'utf8' }).trim();
  return out === '' ? [] : out.split('\n').map((l) => Number(l.trim()));
}

test('workers do not outlive a master killed with SIGKILL, even in a busy loop', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '2', '--worker-timeout', '60']);
  await b.send(queue, { func: 'spin' });
  await waitBusy(port, 1);
  const pid = cli.child.pid as number;
  const children = childrenOf(pid);
  assert.equal(children.length, 2);
  cli.child.kill('SIGKILL');
  await cli.exit;
  await waitFor('the orphaned workers to exit', () => children.every((c) => !alive(c)), 5_000);
  const back = await b.take(queue, 1);
  assert.equal(back[0]?.fields.redelivered, true, 'the broker requeued the unacked message');
});

test('one good task through the bin, as a user would run it', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '2', '--amqp-url', AMQP_URL]);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.channel.publish(`${queue}.x`, 'curio_amqp', Buffer.from('{"func":"add","args":[40,2]}'), {
    replyTo: replies.queue,
    correlationId: 'e2e',
  });
  const [reply] = await b.take(replies.queue, 1);
  assert.equal(reply?.properties.correlationId, 'e2e');
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 42 });
  const line = await waitFor('the outcome log line', () =>
    cli.logs().find((l) => l.msg === 'task succeeded'),
  );
  assert.equal(line.func, 'add');
  assert.equal(line.outcome, 'succeeded');
  assert.equal(typeof line.durationMs, 'number');
  assert.doesNotMatch(cli.stdout(), /\[40,2\]|"args"/, 'no payloads in the logs');
  const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  assert.match(metrics, /^amqp_concurrency_tasks_total\{func="add",outcome="succeeded"\} 1$/m);
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
});

/** Runs `n` tiny tasks through a fresh CLI service: the master's young generation (V8's new space) when ready and at the end. */
async function youngGenerationOver(t: TestContext, n: number, env: Record<string, string> = {}) {
  const queue = freshName(t);
  const { b, port } = await startCliService(t, queue, ['--workers', '2'], env);
  const young = 'nodejs_heap_space_size_total_bytes{space="new"}';
  const ready = await seriesAt(port, young);
  const body = Buffer.from('{"func":"add","args":[1,2]}');
  for (let i = 0; i < n; i++) if (!b.channel.sendToQueue(queue, body)) await once(b.channel, 'drain');
  await b.channel.waitForConfirms();
  const succeeded = 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}';
  await waitFor(`${n} tasks to succeed`, async () => ((await seriesAt(port, succeeded)) ?? 0) >= n, 120_000);
  return { ready, end: await seriesAt(port, young) };
}

test("the master's young generation keeps its size over a long run, unless the user sets a semi-space flag", async (t) => {
  // 40,000 tasks: without the hold, V8 doubled it by 20,000.
  const held = await youngGenerationOver(t, 40_000);
  assert.ok(held.ready !== undefined && held.ready > 0);
  assert.equal(held.end, held.ready, 'the young generation grew');
  // A semi-space flag of the user's own (NODE_OPTIONS allows the maximum) is left to V8,
  // and the same run doubles it.
  const own = await youngGenerationOver(t, 40_000, { NODE_OPTIONS: '--max-semi-space-size=64' });
  assert.ok((own.end ?? 0) > (own.ready ?? 0), `with the user's flag: ${own.ready} → ${own.end}`);
});
