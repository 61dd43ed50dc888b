// Trust at the borders, against the real CLI and broker: what a task, a producer or an
// HTTP client sends the master is checked, bounded or refused. Each test is a finding of
// a security review: the repro first, then what must happen instead.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import {
  chmodSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { GetMessage } from 'amqplib';
import {
  alive,
  cliArgs,
  deleteExchangesAfter,
  freshName,
  getJson,
  ROOT,
  seriesAt,
  spawnCli,
  startCliService,
  waitFor,
} from '../support/helpers.ts';

const TOKEN = 'borders-test-token';
const header = (m: GetMessage | undefined, name: string) => m?.properties.headers?.[name];

test('a task that sends malformed IPC frames or forges a result line is killed; its message ends crashed once; the master lives', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '2']);
  const bad: [string, unknown][] = [
    ['null-frame', { func: 'sendFrame', args: [null] }],
    ['cancelled-5', { func: 'sendFrame', args: [{ type: 'cancelled', taskIds: 5 }] }],
    ['no-type', { func: 'sendFrame', args: [{ hello: 1 }] }],
    ['forged-line', { func: 'forgeResult' }],
  ];
  for (const [id, body] of bad) await b.send(queue, body, { messageId: id });
  await b.send(queue, { func: 'add', args: [1, 2] }, { messageId: 'fine' });
  const dead = await b.take(`${queue}.dead`, bad.length, 30_000);
  const byId = new Map(dead.map((m) => [String(m.properties.messageId), m]));
  for (const [id] of bad) {
    assert.equal(header(byId.get(id), 'x-error-kind'), 'crashed', id);
    assert.match(String(header(byId.get(id), 'x-error-message')), /broke the protocol/, id);
  }
  // A crash gives back what its worker held, so in flight can touch 0 before "fine" ran.
  await waitFor(
    'fine ran',
    async () => (await seriesAt(port, 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}')) === 1,
  );
  await waitFor('everything settled', async () => (await getJson(port, '/health')).body.tasksInFlight === 0);
  // Once each: a hot loop would have run them again and again (16,813 times in 15 s before).
  assert.equal(await b.count(`${queue}.dead`), 0, 'no second dead letter');
  assert.equal(await seriesAt(port, 'amqp_concurrency_tasks_total{func="sendFrame",outcome="crashed"}'), 3);
  assert.equal(await seriesAt(port, 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}'), 1);
  assert.equal((await getJson(port, '/health')).status, 200);
  assert.equal(cli.child.exitCode, null, 'the master is up');
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
});

test('producer headers that cannot be copied into a dead letter: a cleaned copy, consumption never stops', async (t) => {
  const queue = freshName(t);
  const { b, port } = await startCliService(t, queue, ['--prefetch', '4', '--workers', '2']);
  const huge = { big: 'x'.repeat(65_450) };
  // A nested table whose keys are literally "!" and "value": amqplib's typed-value escape.
  const typedEscape = { nested: { '!': 'object', value: { '!': 'no-such-type', value: 'v' } } };
  for (let i = 0; i < 4; i++) {
    await b.send(queue, { func: 'fail', args: ['bad'] }, { messageId: `huge-${i}`, headers: huge });
    await b.send(queue, { func: 'fail', args: ['bad'] }, { messageId: `escape-${i}`, headers: typedEscape });
  }
  for (let i = 0; i < 10; i++) await b.send(queue, { func: 'add', args: [i, 1] }, { messageId: `ok-${i}` });
  const started = performance.now();
  const dead = await b.take(`${queue}.dead`, 8, 30_000);
  t.diagnostic(`8 dead letters in ${Math.round(performance.now() - started)} ms`);
  for (const m of dead) {
    assert.equal(header(m, 'x-error-kind'), 'failed');
    assert.match(
      String(header(m, 'x-error-message')),
      /^bad; the original's headers could not be copied \(1 dropped/,
    );
    assert.equal(header(m, 'x-headers-dropped'), 1);
  }
  // In flight can be 0 for a moment while adds still wait in the queue (prefetch 4): wait
  // for the count of adds itself, then for the rest to settle.
  await waitFor(
    'the 10 adds succeeded',
    async () => (await seriesAt(port, 'amqp_concurrency_tasks_total{func="add",outcome="succeeded"}')) === 10,
  );
  await waitFor('all settled', async () => (await getJson(port, '/health')).body.tasksInFlight === 0);
  assert.equal(await b.count(queue), 0);
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('a result past --max-result-bytes fails its task, and the reply says so', async (t) => {
  const queue = freshName(t);
  const { b } = await startCliService(t, queue, ['--max-result-bytes', String(64 * 1024)]);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(
    queue,
    { func: 'bigResult', args: [3 * 1024 * 1024] },
    { replyTo: replies.queue, correlationId: 'big' },
  );
  await b.send(
    queue,
    { func: 'bigResult', args: [1000] },
    { replyTo: replies.queue, correlationId: 'small' },
  );
  const got = await b.take(replies.queue, 2, 30_000);
  const byId = new Map(got.map((m) => [String(m.properties.correlationId), JSON.parse(String(m.content))]));
  assert.deepEqual(byId.get('big'), {
    ok: false,
    error: {
      kind: 'failed',
      message: `the result is ${3 * 1024 * 1024 + 2} bytes of JSON, over the limit of ${64 * 1024} (--max-result-bytes)`,
    },
  });
  assert.equal(byId.get('small').result.length, 1000);
  const [dead] = await b.take(`${queue}.dead`, 1);
  assert.equal(header(dead, 'x-error-kind'), 'failed');
});

/** The C allocator's settings the image runs the service with (Dockerfile, ENV). */
function imageMalloc(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [, name, value] of readFileSync(join(ROOT, 'Dockerfile'), 'utf8').matchAll(
    /^ENV (MALLOC_[A-Z_]+)=(\S+)$/gm,
  ))
    env[name as string] = value as string;
  assert.ok(Object.keys(env).length > 0, 'the Dockerfile sets the allocator');
  return env;
}

test('a backlog of large bodies keeps the master within the held-bytes budget, and its memory comes back down', async (t) => {
  const queue = freshName(t);
  const budget = 16 * 1024 * 1024;
  const { b, cli, port } = await startCliService(
    t,
    queue,
    ['--workers', '1', '--max-message-bytes', String(8 * 1024 * 1024), '--max-held-bytes', String(budget)],
    imageMalloc(),
  );
  const pid = cli.child.pid as number;
  const rss = () =>
    Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
  const before = rss();
  const held = async () =>
    ((await seriesAt(port, 'nodejs_heap_size_used_bytes')) ?? 0) +
    ((await seriesAt(port, 'nodejs_external_memory_bytes')) ?? 0);
  const heldBefore = await held();
  const pad = 'x'.repeat(4 * 1024 * 1024);
  for (let i = 0; i < 24; i++) await b.send(queue, { func: 'sleep', args: [0.05], kwargs: { pad } });
  let peakHeld = 0;
  let peakRss = 0;
  let paused = false;
  await waitFor(
    'the backlog to be done',
    async () => {
      const health = (await getJson(port, '/health')).body as { amqp: { paused: boolean } };
      paused ||= health.amqp.paused;
      peakHeld = Math.max(peakHeld, (await seriesAt(port, 'amqp_concurrency_held_bytes')) ?? 0);
      peakRss = Math.max(peakRss, rss());
      return (await seriesAt(port, 'amqp_concurrency_tasks_total{func="sleep",outcome="succeeded"}')) === 24;
    },
    120_000,
  );
  t.diagnostic(
    `RSS before ${Math.round(before / 2 ** 20)} MiB, peak ${Math.round(peakRss / 2 ** 20)} MiB; held at most ${Math.round(peakHeld / 2 ** 20)} MiB (budget ${budget / 2 ** 20} MiB)`,
  );
  // The window fits the budget at the largest body (8 MiB: a prefetch of 2), and a body
  // past the window's share pauses consuming: held bytes stay within the budget plus one body.
  assert.ok(peakHeld <= budget + 8 * 1024 * 1024, `held ${peakHeld}`);
  assert.ok(paused || peakHeld <= budget, 'over the budget, consuming paused');
  // The held bytes above are sampled; the window is not: it never opened past what fits the
  // budget (2 at the largest body before one is seen, 3 at these bodies), not even before
  // the first body came in, when the tasks were not timed yet.
  const windows = cli.logs().filter((l) => l.msg === 'prefetch follows the task duration');
  for (const w of windows) assert.ok((w.to as number) <= 3, `the window went to ${w.to}`);
  // Each body is in memory a few times over (the socket's buffer, the Buffer, its text):
  // a margin of 96 MiB over the start, where 24 bodies at once would be near 400 MiB.
  // Each body passes through the master as bytes, text, a parsed value and an IPC frame:
  // the peak follows the bodies passing between two collections, not the backlog.
  assert.ok(
    peakRss - before <= 512 * 1024 * 1024,
    `RSS grew ${Math.round((peakRss - before) / 2 ** 20)} MiB`,
  );
  // Idle after the burst, the master collects its garbage (dispatch/held-bytes.ts) once
  // the last acks' fence has let their bodies go: what the master holds (V8's heap and the
  // Buffers outside it) is back near where it started: within 48 MiB, where the burst's 24
  // bodies are 96 MiB…
  await waitFor(
    'the bodies to be collected',
    async () => (await held()) - heldBefore <= 48 * 1024 * 1024,
    60_000,
  );
  // …and, with the C allocator set as the image sets it (large blocks mapped and unmapped
  // one by one, not kept in its heap), so is the RSS: 30 to 90 MiB over the start here (V8
  // keeps some of the pages it took), against 90 to 120 MiB with glibc's default.
  await waitFor('RSS to come back down', () => rss() - before <= 128 * 1024 * 1024, 60_000);
  t.diagnostic(
    `RSS idle after: ${Math.round(rss() / 2 ** 20)} MiB; heap and Buffers ${Math.round(heldBefore / 2 ** 20)} MiB before, ${Math.round((await held()) / 2 ** 20)} MiB after`,
  );
});

test('PUT /workers past --max-workers is refused with the reason; --workers past it stops start-up with exit 2', async (t) => {
  const queue = freshName(t);
  const { port } = await startCliService(t, queue, ['--max-workers', '3'], { SHUTDOWN_TOKEN: TOKEN });
  const put = async (count: number) =>
    fetch(`http://127.0.0.1:${port}/workers`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ count }),
    });
  const refused = await put(1000);
  assert.equal(refused.status, 400);
  assert.match(
    ((await refused.json()) as { error: string }).error,
    /1000 workers is over --max-workers \(3\)/,
  );
  assert.equal((await put(3)).status, 202);
  await waitFor(
    'three workers up',
    async () => ((await getJson(port, '/health')).body.workers as { up: number }).up === 3,
  );
  const tooMany = spawnCli(t, [...cliArgs(freshName(t)), '--workers', '2000']);
  assert.equal((await tooMany.exit).code, 2);
  assert.match(
    tooMany.stderr(),
    /^amqp-concurrency: --workers: must be a whole number from 1 to 1024 \(got "2000"\)\n$/,
  );
  const overCap = spawnCli(t, [...cliArgs(freshName(t)), '--workers', '5', '--max-workers', '4']);
  assert.equal((await overCap.exit).code, 2);
  assert.match(overCap.stderr(), /--workers: must be at most 4 \(--max-workers; got 5\)/);
});

test('what a task started dies with it: a sleep it spawned is gone after its timeout', async (t) => {
  const queue = freshName(t);
  // Time for the task to spawn the sleep and for the test to see it alive, on a busy machine.
  const { b, port } = await startCliService(t, queue, ['--worker-timeout', '3']);
  const dir = mkdtempSync(join(tmpdir(), 'borders-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const pidFile = join(dir, 'sleep.pid');
  await b.send(queue, { func: 'spawnAndHang', args: [pidFile] });
  await waitFor('the sleep to start', () => existsSync(pidFile) && readFileSync(pidFile, 'utf8') !== '');
  const sleepPid = Number(readFileSync(pidFile, 'utf8'));
  assert.ok(alive(sleepPid));
  const [dead] = await b.take(`${queue}.dead`, 1, 30_000);
  assert.equal(header(dead, 'x-error-kind'), 'timeout');
  await waitFor('the sleep the task started to be gone', () => !alive(sleepPid), 10_000);
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('task code sees no secret: not AMQP_URL, SHUTDOWN_TOKEN, nor a variable named like a password', async (t) => {
  const queue = freshName(t);
  const { b } = await startCliService(t, queue, [], {
    SHUTDOWN_TOKEN: TOKEN,
    DB_PASSWORD: 'pw',
    STRIPE_SECRET_KEY: 'sk',
    TASK_SETTING: 'visible',
  });
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(
    queue,
    {
      func: 'envOf',
      args: ['AMQP_URL', 'SHUTDOWN_TOKEN', 'DB_PASSWORD', 'STRIPE_SECRET_KEY', 'TASK_SETTING'],
    },
    { replyTo: replies.queue },
  );
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)).result, {
    AMQP_URL: null,
    SHUTDOWN_TOKEN: null,
    DB_PASSWORD: null,
    STRIPE_SECRET_KEY: null,
    TASK_SETTING: 'visible',
  });
});

test('integers past 2^53 reach the task exactly and come back exactly; 1e400 is rejected, never null', async (t) => {
  const queue = freshName(t);
  const { b } = await startCliService(t, queue);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(queue, Buffer.from('{"func":"double","args":[12345678901234567890]}'), {
    replyTo: replies.queue,
    correlationId: 'big',
  });
  await b.send(queue, Buffer.from('{"func":"echo","args":[1e400]}'), { messageId: 'inf' });
  const [reply] = await b.take(replies.queue, 1);
  assert.equal(String(reply?.content), '{"ok":true,"result":24691357802469135780}');
  const [dead] = await b.take(`${queue}.dead`, 1);
  assert.equal(header(dead, 'x-error-kind'), 'rejected');
  assert.match(String(header(dead, 'x-error-message')), /too large to be held/);
});

test('HTTP: a request whose body never comes is closed, and the service answers the next', async (t) => {
  const queue = freshName(t);
  const { port } = await startCliService(t, queue, [], { SHUTDOWN_TOKEN: TOKEN });
  const socket = connect(port, '127.0.0.1');
  t.after(() => socket.destroy());
  const closed = once(socket, 'close');
  socket.on('error', () => {});
  await once(socket, 'connect');
  socket.write(
    `PUT /workers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{`,
  );
  const started = performance.now();
  const timer = setTimeout(() => socket.destroy(new Error('still open')), 30_000);
  await closed;
  clearTimeout(timer);
  const waited = performance.now() - started;
  t.diagnostic(`closed after ${Math.round(waited)} ms`);
  assert.ok(waited < 20_000, `the server held the request ${Math.round(waited)} ms`);
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('a fork that fails (no file descriptors left) ends that attempt, never the master', async (t) => {
  const queue = freshName(t);
  const { port, cli } = await startCliService(t, queue, ['--workers', '1']);
  const pid = cli.child.pid as number;
  // The master's open-file limit just over what it has open: the next forks (a pipe and a
  // socket pair each) fail with EMFILE. SIGTTIN asks for workers without opening a file.
  const open = readdirSync(`/proc/${pid}/fd`).length;
  const limits = execFileSync(
    'prlimit',
    ['--pid', String(pid), '--nofile', '--output=SOFT,HARD', '--noheadings'],
    {
      encoding: 'utf8',
    },
  )
    .trim()
    .split(/\s+/);
  execFileSync('prlimit', ['--pid', String(pid), `--nofile=${open + 1}:${limits[1]}`]);
  for (let i = 0; i < 3; i++) process.kill(pid, 'SIGTTIN');
  await waitFor('a failed start logged', () =>
    cli
      .logs()
      .some(
        (l) =>
          /could not be started|failed to start/.test(String(l.msg)) ||
          /could not be started/.test(JSON.stringify(l.err ?? '')),
      ),
  );
  assert.equal(cli.child.exitCode, null, 'the master is up');
  execFileSync('prlimit', ['--pid', String(pid), `--nofile=${limits[0]}:${limits[1]}`]);
  await waitFor(
    'the pool to grow once descriptors are back',
    async () => {
      // Signals that arrive together may fold into one: whatever was asked for, all of it.
      const w = (await getJson(port, '/health')).body.workers as { up: number; desired: number };
      return w.desired > 1 && w.up === w.desired;
    },
    60_000,
  );
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('start-up refuses what cannot run, each in one line with exit 2', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'borders-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const exits = join(dir, 'exits.ts');
  writeFileSync(exits, 'process.exit(0);\nexport function f() {}\n');
  const cases: [string[], Record<string, string>, RegExp][] = [
    [
      [],
      { PREFETCH: '70000' },
      /^amqp-concurrency: PREFETCH: must be a whole number from 1 to 65535 \(got "70000"\)$/m,
    ],
    [
      [],
      { MAX_RETRIES: '4294967296' },
      /^amqp-concurrency: MAX_RETRIES: must be a whole number from 0 to 1000/m,
    ],
    [['--task-path', exits], {}, /exited while loading the task module/],
  ];
  for (const [args, env, line] of cases) {
    const cli = spawnCli(t, [...cliArgs(freshName(t)), ...args], env);
    const { code } = await cli.exit;
    assert.equal(code, 2, `${JSON.stringify(env)} ${args.join(' ')}: ${cli.stderr()}`);
    assert.match(cli.stderr(), line);
  }
});

test('a task that sends SIGTERM to its master does not stop the service', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(queue, { func: 'termMaster' }, { replyTo: replies.queue });
  const [reply] = await b.take(replies.queue, 1);
  assert.equal(JSON.parse(String(reply?.content)).result, 'EPERM');
  assert.equal((await getJson(port, '/health')).status, 200);
  assert.equal(cli.child.exitCode, null);
});

test('the crash journal lives in a private folder; a folder someone else made is refused loudly', async (t) => {
  const state = mkdtempSync(join(tmpdir(), 'borders-state-'));
  t.after(() => rmSync(state, { recursive: true, force: true }));
  const queue = freshName(t);
  const { b, cli } = await startCliService(t, queue, ['--state-dir', state]);
  const uid = process.getuid?.() ?? 0;
  const folder = join(state, `amqp-concurrency-${uid}`);
  assert.equal(statSync(folder).mode & 0o777, 0o700);
  cli.child.kill('SIGTERM');
  await cli.exit;
  // Someone else's (here: one anyone may write): refused, said at start-up, and the service runs.
  chmodSync(folder, 0o777);
  const second = freshName(t);
  b.cleanup(second, `${second}.dead`);
  const again = spawnCli(t, [...cliArgs(second), '--state-dir', state], {
    SHUTDOWN_TOKEN: 'change-me',
  });
  deleteExchangesAfter(t, `${second}.x`);
  await waitFor('ready', () => again.logs().some((l) => l.msg === 'ready'));
  const warnings = again
    .logs()
    .filter((l) => l.level === 40)
    .map((l) => String(l.msg));
  assert.ok(
    warnings.some((m) => m.startsWith('the crash journal cannot be kept')),
    warnings.join('\n'),
  );
  assert.ok(
    warnings.some((m) => m.startsWith('SHUTDOWN_TOKEN is a placeholder')),
    warnings.join('\n'),
  );
  // Stopped before the teardown deletes its queue, which a running service would declare again.
  again.child.kill('SIGTERM');
  await again.exit;
});
