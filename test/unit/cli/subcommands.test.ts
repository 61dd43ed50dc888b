// The `publish` and `status` subcommands' pure parts: reading argv and env, and the table.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type CancelPlan, parseCancelArgs } from '../../../src/cli/cancel-command.ts';
import { type PublishPlan, parseArg, parsePublishArgs } from '../../../src/cli/publish-command.ts';
import { formatStatus, parseStatusArgs } from '../../../src/cli/status-command.ts';
import type { StatusReport } from '../../../src/http/server.ts';

function plan(argv: string[], env: Record<string, string> = {}): PublishPlan {
  const p = parsePublishArgs(argv, env);
  assert.notEqual(p, 'help');
  return p as PublishPlan;
}

/** Asserts bad usage: ERR_CONFIG (exit 2) with a message matching `message`. */
function bad(run: () => unknown, message: RegExp): void {
  assert.throws(run, (err: Error & { code?: string }) => {
    assert.equal(err.code, 'ERR_CONFIG');
    assert.match(err.message, message);
    assert.doesNotMatch(err.message, /\n/);
    return true;
  });
}

test('each ARG is JSON where it parses and a plain string otherwise', () => {
  const cases: [string, unknown][] = [
    ['1', 1],
    ['-2.5', -2.5],
    ['"1"', '1'],
    ['[1,2]', [1, 2]],
    ['{"a":1}', { a: 1 }],
    ['true', true],
    ['null', null],
    ['hello', 'hello'],
    ['hello world', 'hello world'],
    ['', ''],
    ['{not json', '{not json'],
    ['01', '01'],
  ];
  for (const [word, value] of cases) assert.deepEqual(parseArg(word), value, word);
});

test('publish: FUNC, ARGS, --kwargs and --wait; the service defaults for the broker', () => {
  assert.deepEqual(plan(['add', '1', '2']), {
    func: 'add',
    args: [1, 2],
    kwargs: undefined,
    waitMs: undefined,
    url: undefined,
    exchange: 'curio_amqp_exchange',
    routingKey: 'curio_amqp',
    priority: undefined,
    delayMs: undefined,
  });
  const prioritised = plan(['add', '--priority', '9', '--delay', '1.5']);
  assert.equal(prioritised.priority, 9);
  assert.equal(prioritised.delayMs, 1500);
  const p = plan(['greet', '--wait', 'Ada', '--kwargs', '{"greeting":"Hi"}', '--timeout=2.5']);
  assert.equal(p.func, 'greet');
  assert.deepEqual(p.args, ['Ada']);
  assert.deepEqual(p.kwargs, { greeting: 'Hi' });
  assert.equal(p.waitMs, 2500);
  assert.equal(plan(['add', '--wait']).waitMs, 30_000);
  // Only `--` starts an option: a negative number is an argument; after `--`, all are.
  assert.deepEqual(plan(['add', '-1', '--', '--wait', '-h']).args, [-1, '--wait', '-h']);
  assert.equal(plan(['add', '--', '--wait']).waitMs, undefined);
});

test('publish: a flag beats its env variable, which beats the default; the seed spelling works', () => {
  const env = { AMQP_URL: 'amqp://env-host/', EXCHANGE: 'env-x', ROUTING_KEY: 'env-rk' };
  assert.deepEqual((({ url, exchange, routingKey }) => ({ url, exchange, routingKey }))(plan(['f'], env)), {
    url: 'amqp://env-host/',
    exchange: 'env-x',
    routingKey: 'env-rk',
  });
  const flagged = plan(
    ['f', '--amqp-url', 'amqps://flag-host/', '--exchange=flag-x', '--routing-key', 'flag-rk'],
    env,
  );
  assert.equal(flagged.url, 'amqps://flag-host/');
  assert.equal(flagged.exchange, 'flag-x');
  assert.equal(flagged.routingKey, 'flag-rk');
  assert.equal(plan(['f', '--amqp_url', 'amqp://seed/'], env).url, 'amqp://seed/');
  assert.equal(plan(['f', '--exchange', 'a', '--exchange', 'b']).exchange, 'b', 'the later flag wins');
  // An empty env variable counts as unset, as for the service.
  assert.equal(plan(['f'], { EXCHANGE: '' }).exchange, 'curio_amqp_exchange');
});

test('publish: bad usage is one line naming the flag (exit 2)', () => {
  bad(() => parsePublishArgs([], {}), /^publish: FUNC is missing/);
  bad(() => parsePublishArgs(['--wait'], {}), /^publish: FUNC is missing/);
  bad(() => parsePublishArgs([''], {}), /^publish: FUNC is missing/);
  bad(() => parsePublishArgs(['f', '--kwargs', '[1]'], {}), /^--kwargs: must be a JSON object/);
  bad(() => parsePublishArgs(['f', '--kwargs', 'null'], {}), /^--kwargs: must be a JSON object/);
  bad(() => parsePublishArgs(['f', '--kwargs', '{a:1}'], {}), /^--kwargs: is not JSON/);
  bad(() => parsePublishArgs(['f', '--kwargs'], {}), /^--kwargs: needs a value/);
  bad(() => parsePublishArgs(['f', '--wait', '--timeout', '0'], {}), /^--timeout: must be a number/);
  bad(() => parsePublishArgs(['f', '--wait', '--timeout', 'soon'], {}), /^--timeout: must be a number/);
  bad(() => parsePublishArgs(['f', '--timeout', '5'], {}), /^--timeout: only means something with --wait/);
  bad(() => parsePublishArgs(['f', '--wait=yes'], {}), /^--wait: takes no value/);
  bad(() => parsePublishArgs(['f', '--workers', '2'], {}), /^--workers: unknown option/);
  bad(() => parsePublishArgs(['f', '--amqp-url', 'http://x/'], {}), /^--amqp-url: must be an amqp:\/\//);
  bad(() => parsePublishArgs(['f'], { AMQP_URL: 'nope' }), /^AMQP_URL: is not a URL/);
  bad(() => parsePublishArgs(['f', '--exchange='], {}), /^--exchange: must not be empty/);
  // A password stays out of the message.
  assert.throws(
    () => parsePublishArgs(['f', '--amqp-url', 'amqp://u:secret@[bad/'], {}),
    (err: Error) => !err.message.includes('secret'),
  );
});

test('publish and status: --help and -h', () => {
  assert.equal(parsePublishArgs(['--help'], {}), 'help');
  assert.equal(parsePublishArgs(['add', '1', '-h'], {}), 'help');
  assert.equal(parseStatusArgs(['--help'], {}), 'help');
});

test('status: the URL and the token, from flags or env', () => {
  const byDefault = parseStatusArgs([], {});
  if (byDefault === 'help') return assert.fail('not help');
  assert.equal(byDefault.url.href, 'http://127.0.0.1:8080/status');
  assert.equal(byDefault.token, '');
  const fromEnv = parseStatusArgs([], { HTTP_PORT: '9000', SHUTDOWN_TOKEN: 'env-token' });
  if (fromEnv === 'help') return assert.fail('not help');
  assert.equal(fromEnv.url.href, 'http://127.0.0.1:9000/status');
  assert.equal(fromEnv.token, 'env-token');
  const fromFlags = parseStatusArgs(['--url', 'https://ops.example/svc', '--token=flag-token'], {
    SHUTDOWN_TOKEN: 'env-token',
  });
  if (fromFlags === 'help') return assert.fail('not help');
  assert.equal(fromFlags.url.href, 'https://ops.example/svc/status', 'a path prefix is kept');
  assert.equal(fromFlags.token, 'flag-token');
  bad(
    () => parseStatusArgs(['--url', 'localhost:8080'], {}),
    /^--url: must be an http:\/\/ or https:\/\/ URL/,
  );
  bad(() => parseStatusArgs(['--url', 'not a url'], {}), /^--url: is not a URL/);
  bad(() => parseStatusArgs(['extra'], {}), /^extra: unexpected argument/);
  bad(() => parseStatusArgs(['--token'], {}), /^--token: needs a value/);
  bad(() => parseStatusArgs(['--wait'], {}), /^--wait: unknown option/);
});

test('status: the table has a row per worker, aligned, and a summary line', () => {
  const report: StatusReport = {
    health: {
      status: 'workers down',
      reason: '1 of 2 workers are up',
      amqp: { connected: true, blocked: false, paused: false },
      workers: { desired: 2, up: 1, busy: 1 },
      tasksInFlight: 1,
    },
    workers: [
      {
        pid: 4242,
        state: 'busy',
        func: 'sleep',
        runningForMs: 1234,
        tasksDone: 17,
        held: 1,
        rssBytes: 52_428_800,
      },
      {
        pid: undefined,
        state: 'starting',
        func: undefined,
        runningForMs: undefined,
        tasksDone: 0,
        held: 0,
        rssBytes: undefined,
      },
      {
        pid: 7,
        state: 'busy',
        func: 'fib',
        runningForMs: 125_000,
        tasksDone: 3,
        held: 1,
        rssBytes: 1_048_576,
      },
    ],
    queued: 5,
    prefetch: 64,
    funcs: {},
  };
  assert.equal(
    formatStatus(report),
    [
      'PID   STATE     FUNC   FOR        TASKS  RSS',
      '4242  busy      sleep  1.2 s      17     50.0 MB',
      '-     starting  -      -          0      -',
      '7     busy      fib    2 min 5 s  3      1.0 MB',
      '',
      'status workers down (1 of 2 workers are up); 1/2 workers up; 5 queued; prefetch 64',
      '',
    ].join('\n'),
  );
  const limited = formatStatus({
    ...report,
    workers: [],
    funcs: {
      resize: { timeoutMs: 120_000, maxRetries: 5, running: 0 },
      charge: { concurrency: 1, rateLimit: '5/s', running: 1 },
    },
  });
  assert.ok(
    limited.endsWith(
      [
        'FUNC    TIMEOUT    RETRIES  CONCURRENCY  RATE  RUNNING',
        'resize  2 min 0 s  5        -            -     0',
        'charge  -          -        1            5/s   1',
        '',
      ].join('\n'),
    ),
    limited,
  );
});

test('publish: --priority and --delay out of range are one line each (exit 2)', () => {
  bad(
    () => parsePublishArgs(['add', '--priority', '256'], {}),
    /^--priority: must be a whole number from 0 to 255/,
  );
  bad(() => parsePublishArgs(['add', '--priority', '1.5'], {}), /^--priority: must be a whole number/);
  bad(() => parsePublishArgs(['add', '--delay', '-1'], {}), /^--delay: must be a number of seconds/);
  bad(() => parsePublishArgs(['add', '--delay', 'soon'], {}), /^--delay: must be a number of seconds/);
});

test('cancel: one MESSAGE_ID, --wait, the queue and URL as the service takes them', () => {
  const p = parseCancelArgs(['abc', '--queue', 'jobs', '--wait', '0.5'], {}) as CancelPlan;
  assert.deepEqual(p, { messageId: 'abc', waitMs: 500, url: undefined, queue: 'jobs' });
  const fromEnv = parseCancelArgs(['abc'], { QUEUE: 'q2', AMQP_URL: 'amqp://u:p@h/' }) as CancelPlan;
  assert.equal(fromEnv.queue, 'q2');
  assert.equal(fromEnv.url, 'amqp://u:p@h/');
  assert.equal(fromEnv.waitMs, 2000);
  assert.equal(parseCancelArgs(['--help'], {}), 'help');
  bad(() => parseCancelArgs([], {}), /^cancel: MESSAGE_ID is missing/);
  bad(() => parseCancelArgs(['a', 'b'], {}), /^b: unexpected argument/);
  bad(() => parseCancelArgs(['a', '--wait', '0'], {}), /^--wait: must be a number of seconds/);
  bad(() => parseCancelArgs(['x'.repeat(256)], {}), /at most 255 bytes/);
});
