// `amqp-concurrency publish` and `amqp-concurrency status` as a user runs them: the CLI
// spawned (node src/cli.ts), against a service spawned the same way and the real broker.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:net';
import { test } from 'node:test';
import { promisify } from 'node:util';
import type { StatusReport } from '../../src/http/server.ts';
import {
  AMQP_URL,
  type Broker,
  broker,
  CLI,
  deleteExchangesAfter,
  freshName,
  ROOT,
  type spawnCli,
  startCliService,
  waitFor,
} from '../support/helpers.ts';

type TestContext = Parameters<typeof spawnCli>[0];
const run = promisify(execFile);
const TOKEN = 'tok';

/** A CLI service (fixture tasks, two workers, the token set); its exchange and routing key as flags. */
async function service(t: TestContext) {
  const queue = freshName(t);
  const { b, port } = await startCliService(t, queue, ['--workers', '2'], { SHUTDOWN_TOKEN: TOKEN });
  const exchange = `${queue}.x`;
  return { b, port, exchange, flags: ['--exchange', exchange, '--routing-key', 'curio_amqp'] };
}

/** Runs a subcommand to its end; env is added to the test's (AMQP_URL set, the others unset). */
async function cli(args: string[], env: Record<string, string> = {}) {
  const { EXCHANGE: _e, ROUTING_KEY: _r, SHUTDOWN_TOKEN: _s, HTTP_PORT: _h, ...base } = process.env;
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args], {
      cwd: ROOT,
      env: { ...base, AMQP_URL, ...env },
      timeout: 60_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** A port nothing listens on (one that was free a moment ago). */
async function closedPort(): Promise<number> {
  const server = createServer().listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  server.close();
  await once(server, 'close');
  return port;
}

/** An exchange and a queue bound with `rk` and no consumer: what `publish` sends stays there to be read. */
async function quietQueue(t: TestContext, b: Broker) {
  const queue = freshName(t);
  const exchange = `${queue}.x`;
  // Durable: RabbitMQ 4 deprecates transient non-exclusive queues (and will refuse them).
  await b.channel.assertExchange(exchange, 'direct', { durable: true });
  await b.channel.assertQueue(queue, { durable: true });
  await b.channel.bindQueue(queue, exchange, 'rk');
  b.cleanup(queue);
  deleteExchangesAfter(t, exchange);
  return { queue, flags: ['--exchange', exchange, '--routing-key', 'rk'] };
}

test('`publish add 1 2 --wait` prints 3 against a running service', async (t) => {
  const s = await service(t);
  const waited = await cli(['publish', 'add', '1', '2', '--wait', ...s.flags]);
  assert.equal(waited.stderr, '');
  assert.equal(waited.stdout, '3\n');
  assert.equal(waited.code, 0);
});

test('publish --wait: the result as JSON; a task that does not succeed exits 1 with its outcome', async (t) => {
  const s = await service(t);
  const echoed = await cli([
    'publish',
    'echo',
    'x',
    '"7"',
    '[1,2]',
    '-3',
    '--kwargs',
    '{"k":true}',
    '--wait',
    ...s.flags,
    '--',
    '--literal',
  ]);
  assert.equal(echoed.code, 0, echoed.stderr);
  assert.equal(echoed.stdout, '["x","7",[1,2],-3,"--literal",{"k":true}]\n');

  const failed = await cli(['publish', 'fail', 'nope', '--wait', ...s.flags]);
  assert.equal(failed.code, 1);
  assert.equal(failed.stdout, '');
  assert.equal(failed.stderr, 'failed: nope\n');

  const unknown = await cli(['publish', 'noSuchTask', '--wait', ...s.flags]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /^rejected: .*noSuchTask/);
});

test('publish takes the broker settings from flags over env over defaults, as the service does', async (t) => {
  const s = await service(t);
  // From the env alone.
  const fromEnv = await cli(['publish', 'add', '2', '2', '--wait'], {
    EXCHANGE: s.exchange,
    ROUTING_KEY: 'curio_amqp',
  });
  assert.equal(fromEnv.stdout, '4\n', fromEnv.stderr);
  // The flags beat a wrong env; the seed spelling --amqp_url works.
  const flagged = await cli(['publish', 'add', '3', '3', '--wait', '--amqp_url', AMQP_URL, ...s.flags], {
    EXCHANGE: 'wrong-exchange',
    ROUTING_KEY: 'wrong-key',
    AMQP_URL: 'amqp://testuser:testuser@127.0.0.1:1/',
  });
  assert.equal(flagged.stdout, '6\n', flagged.stderr);
});

test('publish without --wait prints the message id; the message carries it and the parsed ARGS', async (t) => {
  const b = await broker(t);
  const q = await quietQueue(t, b);
  const sent = await cli(['publish', 'echo', '1', '"1"', 'hello world', '{"a":[true,null]}', ...q.flags]);
  assert.equal(sent.code, 0, sent.stderr);
  assert.match(sent.stdout, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n$/);
  const [m] = await b.take(q.queue, 1);
  assert.ok(m !== undefined);
  assert.equal(m.properties.messageId, sent.stdout.trim());
  assert.equal(m.properties.deliveryMode, 2);
  assert.deepEqual(JSON.parse(m.content.toString()), {
    func: 'echo',
    args: [1, '1', 'hello world', { a: [true, null] }],
  });

  const withKwargs = await cli(['publish', 'greet', 'Ada', '--kwargs={"greeting":"Hi"}', ...q.flags]);
  assert.equal(withKwargs.code, 0, withKwargs.stderr);
  const [k] = await b.take(q.queue, 1);
  assert.deepEqual(JSON.parse(String(k?.content)), {
    func: 'greet',
    args: ['Ada'],
    kwargs: { greeting: 'Hi' },
  });
});

test('publish --wait gives up after --timeout; a message no queue takes is an error, not a silent drop', async (t) => {
  const b = await broker(t);
  const q = await quietQueue(t, b);
  const started = performance.now();
  const waited = await cli(['publish', 'add', '1', '2', '--wait', '--timeout', '0.5', ...q.flags]);
  assert.equal(waited.code, 1);
  assert.equal(waited.stdout, '');
  assert.match(
    waited.stderr,
    /^amqp-concurrency: no result for add within 500 ms \(the task may still run\)\n$/,
  );
  assert.ok(performance.now() - started < 20_000);
  assert.equal(await b.count(q.queue), 1, 'the message was sent all the same');

  const lost = await cli(['publish', 'add', '1', ...q.flags, '--routing-key', 'nobody-listens']);
  assert.equal(lost.code, 1);
  assert.equal(lost.stdout, '');
  assert.match(lost.stderr, /^amqp-concurrency: no queue is bound to exchange .* "nobody-listens"/);

  const missing = await cli(['publish', 'add', '1', '--exchange', `${freshName(t)}.missing`]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^amqp-concurrency: the broker did not confirm the message: .*NOT_FOUND/);

  const down = await cli(['publish', 'add', '1', '--amqp-url', 'amqp://testuser:secret@127.0.0.1:1/']);
  assert.equal(down.code, 1);
  assert.match(
    down.stderr,
    /^amqp-concurrency: cannot connect to amqp:\/\/testuser:\*\*\*@127\.0\.0\.1:1\/: .*ECONNREFUSED/,
  );
  assert.doesNotMatch(down.stderr, /secret/);
});

test('bad usage of publish and status: one line on stderr, exit 2', async () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [['publish'], {}, /^publish: FUNC is missing/],
    [['publish', '--wait'], {}, /^publish: FUNC is missing/],
    [['publish', 'add', '--kwargs', '[1]'], {}, /^--kwargs: must be a JSON object/],
    [['publish', 'add', '--kwargs', '{oops'], {}, /^--kwargs: is not JSON/],
    [['publish', 'add', '--bogus'], {}, /^--bogus: unknown option/],
    [['publish', 'add', '--wait', '--timeout', '-1'], {}, /^--timeout: must be a number/],
    [['publish', 'add', '--amqp-url', 'http://localhost/'], {}, /^--amqp-url: must be an amqp:\/\//],
    [['publish', 'add'], { AMQP_URL: 'localhost' }, /^AMQP_URL: is not a URL/],
    [['publish', 'add', '--exchange'], {}, /^--exchange: needs a value/],
    [['status', 'extra'], {}, /^extra: unexpected argument/],
    [['status', '--url', 'ftp://host/'], {}, /^--url: must be an http:\/\/ or https:\/\/ URL/],
    [['status', '--nope'], {}, /^--nope: unknown option/],
  ];
  for (const [args, env, message] of cases) {
    const r = await cli(args, env);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.equal(r.stdout, '');
    const lines = r.stderr.split('\n');
    assert.equal(lines.length, 2, `one line: ${r.stderr}`);
    assert.match((lines[0] as string).replace(/^amqp-concurrency: /, ''), message, args.join(' '));
  }
});

test('--help for each subcommand', async () => {
  const publish = await cli(['publish', '--help']);
  assert.equal(publish.code, 0);
  assert.match(publish.stdout, /^Usage: amqp-concurrency publish FUNC \[ARGS\.\.\.\]/);
  for (const flag of ['--kwargs', '--wait', '--timeout', '--amqp-url', '--exchange', '--routing-key'])
    assert.ok(publish.stdout.includes(flag), flag);
  const status = await cli(['status', '-h']);
  assert.equal(status.code, 0);
  assert.match(status.stdout, /^Usage: amqp-concurrency status/);
  assert.match(status.stdout, /SHUTDOWN_TOKEN/);
  const main = await cli(['--help']);
  assert.match(main.stdout, /amqp-concurrency publish FUNC/);
});

test('`status` prints the workers as a table with their pids, behind the token', async (t) => {
  const s = await service(t);
  const url = `http://127.0.0.1:${s.port}`;
  // One worker busy with a long task, so that the table shows a func and for how long.
  await cli(['publish', 'sleep', '30', ...s.flags]);
  const report = await waitFor('a busy worker', async () => {
    const res = await fetch(`${url}/status`, { headers: { authorization: `Bearer ${TOKEN}` } });
    const body = (await res.json()) as StatusReport;
    return body.workers.some((w) => w.state === 'busy') ? body : undefined;
  });
  const pids = report.workers.map((w) => w.pid).sort();
  assert.equal(pids.length, 2);

  const shown = await cli(['status', '--url', url, '--token', TOKEN]);
  assert.equal(shown.code, 0, shown.stderr);
  const lines = shown.stdout.split('\n');
  assert.match(lines[0] as string, /^PID\s+STATE\s+FUNC\s+FOR\s+TASKS\s+RSS$/);
  const rows = lines.slice(1, 3).map((l) => l.split(/\s{2,}/));
  assert.deepEqual(rows.map((r) => Number(r[0])).sort(), pids);
  const busy = rows.find((r) => r[1] === 'busy');
  assert.ok(busy !== undefined, shown.stdout);
  assert.equal(busy[2], 'sleep');
  assert.match(busy[3] as string, /^\d+\.\d s$/);
  const idle = rows.find((r) => r[1] === 'idle');
  assert.ok(idle !== undefined, shown.stdout);
  assert.equal(idle[2], '-');
  assert.match(shown.stdout, /\nstatus ok; 2\/2 workers up; \d+ queued; prefetch \d+\n$/);

  // The token from the env works as well; a wrong or missing one is refused with exit 1.
  const fromEnv = await cli(['status', '--url', url], { SHUTDOWN_TOKEN: TOKEN });
  assert.equal(fromEnv.code, 0, fromEnv.stderr);
  const denied = await cli(['status', '--url', url], { SHUTDOWN_TOKEN: 'wrong' });
  assert.equal(denied.code, 1);
  assert.match(denied.stderr, /^status: 401 .*pass --token or set SHUTDOWN_TOKEN/);
  assert.equal(denied.stdout, '');
  const closed = await closedPort();
  const unreachable = await cli(['status', '--url', `http://127.0.0.1:${closed}`, '--token', TOKEN]);
  assert.equal(unreachable.code, 1);
  assert.equal(unreachable.stderr, `status: cannot reach http://127.0.0.1:${closed}/status: ECONNREFUSED\n`);
});
