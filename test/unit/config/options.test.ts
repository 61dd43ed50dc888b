import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { defaultPrefetch, MAX_PER_WORKER, MIN_PER_WORKER } from '../../../src/amqp/prefetch.ts';
import { redactUrl, splitUrls } from '../../../src/amqp/url.ts';
import { ENV_ONLY, OPTIONS } from '../../../src/config/option-table.ts';
import { helpText, optionsMarkdown, parseConfig, shownDefault } from '../../../src/config/options.ts';
import type { ServiceError } from '../../../src/errors.ts';

function config(argv: string[], env: Record<string, string> = {}) {
  const parsed = parseConfig(argv, env);
  assert.equal(parsed.kind, 'run');
  return (parsed as Extract<typeof parsed, { kind: 'run' }>).config;
}

function configError(argv: string[], env: Record<string, string> = {}): string {
  try {
    parseConfig(argv, env);
  } catch (err) {
    assert.equal((err as ServiceError).code, 'ERR_CONFIG');
    const message = (err as Error).message;
    assert.equal(message.split('\n').length, 1, 'one line');
    return message;
  }
  assert.fail(`no error for ${argv.join(' ')} ${JSON.stringify(env)}`);
}

test("the defaults that README's options table names", () => {
  const c = config([]);
  assert.equal(c.workers, 1);
  assert.equal(c.workerTimeout, 30);
  assert.equal(c.amqpUrl, 'amqp://testuser:testuser@localhost:5672/');
  assert.equal(c.exchange, 'curio_amqp_exchange');
  assert.equal(c.queue, 'curio_amqp_queue');
  assert.equal(c.routingKey, 'curio_amqp');
  assert.equal(c.httpHost, '0.0.0.0');
  assert.equal(c.httpPort, 8080);
  assert.equal(c.shutdownTimeout, 30);
  assert.equal(c.shutdownToken, undefined);
  assert.equal(c.prefetch, defaultPrefetch(1));
  assert.equal(c.prefetchAuto, true, 'no prefetch given: it follows the tasks');
  assert.match(c.taskPath, /tasks\/index\.ts$/);
  assert.equal(c.maxRetries, 0);
  assert.equal(c.queueType, 'classic');
});

test("every flag, the Python tool's spellings, and --flag=value", () => {
  const c = config([
    '--workers',
    '4',
    '--task_path',
    'x.ts',
    '--worker_timeout',
    '2.5',
    '--amqp_url',
    'amqps://u:p@h:5671/v',
    '--exchange',
    'e',
    '--queue',
    'q',
    '--routing-key',
    'k',
    '--prefetch=7',
    '--http-host',
    '127.0.0.1',
    '--http-port',
    '0',
    '--shutdown-timeout',
    '3',
    '--max-retries',
    '2',
    '--retry-delay',
    '0.5',
    '--queue-type',
    'quorum',
    '--kill-grace',
    '0',
    '--max-tasks-per-worker',
    '10',
    '--max-worker-memory',
    '512',
  ]);
  assert.deepEqual(
    [c.workers, c.taskPath, c.workerTimeout, c.amqpUrl, c.exchange, c.queue, c.routingKey, c.prefetch],
    [4, 'x.ts', 2.5, 'amqps://u:p@h:5671/v', 'e', 'q', 'k', 7],
  );
  assert.deepEqual(
    [c.httpHost, c.httpPort, c.shutdownTimeout, c.maxRetries, c.retryDelay, c.queueType, c.killGrace],
    ['127.0.0.1', 0, 3, 2, 0.5, 'quorum', 0],
  );
  assert.deepEqual([c.maxTasksPerWorker, c.maxWorkerMemory], [10, 512]);
  assert.deepEqual(
    config(['--task-path', 'a', '--worker-timeout', '1', '--amqp-url', 'amqp://h']).taskPath,
    'a',
  );
});

test('a flag beats its env variable, which beats the default', () => {
  assert.equal(config([], { WORKERS: '3' }).workers, 3);
  assert.equal(config(['--workers', '5'], { WORKERS: '3' }).workers, 5);
  assert.equal(config([], { WORKERS: '' }).workers, 1, 'an empty variable is unset');
  assert.equal(config([], { SHUTDOWN_TOKEN: 't0k' }).shutdownToken, 't0k');
  assert.equal(config([], { QUEUE: 'fromenv' }).queue, 'fromenv');
  assert.equal(
    config([], { WORKERS: '2' }).prefetch,
    defaultPrefetch(2),
    'the default prefetch follows the workers',
  );
  assert.equal(
    config([], { WORKERS: '4' }).prefetch,
    64,
    'within the memory budget: 64 MiB of held bodies at the largest body accepted (1 MiB)',
  );
  assert.equal(
    config(['--max-held-bytes', String(8 * 2 ** 20), '--max-message-bytes', String(2 ** 20)], {}).prefetch,
    8,
  );
  assert.equal(
    config(['--max-message-bytes', String(32 * 2 ** 20)], {}).maxHeldBytes,
    128 * 2 ** 20,
    'at least four of the largest body',
  );
  assert.equal(config([], { PREFETCH: '7' }).prefetchAuto, false, 'a prefetch given stays fixed');
});

test('--help and --version', () => {
  assert.deepEqual(parseConfig(['--help'], {}), { kind: 'help' });
  assert.deepEqual(parseConfig(['--workers', '2', '-h'], {}), { kind: 'help' });
  assert.deepEqual(parseConfig(['--version'], {}), { kind: 'version' });
});

test('every bad value: one line naming the flag, and never a password', () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [['--workers', '0'], {}, /^--workers: must be a whole number of at least 1/],
    [['--workers', '-1'], {}, /^--workers: /],
    [['--workers', '1.5'], {}, /^--workers: /],
    [['--workers', 'abc'], {}, /^--workers: /],
    [['--bogus'], {}, /^--bogus: unknown option/],
    [['stray'], {}, /^stray: unexpected argument/],
    [['--queue'], {}, /^--queue: needs a value/],
    [['--queue', ''], {}, /^--queue: must not be empty/],
    [['--amqp-url', 'http://u:secret@h/'], {}, /^--amqp-url: must be an amqp:\/\/ or amqps:\/\/ URL/],
    [['--amqp-url', 'amqp//u:secret@h:x:y'], {}, /^--amqp-url: is not a URL/],
    [['--http-port', '70000'], {}, /^--http-port: must be a port number/],
    [['--worker-timeout', '0'], {}, /^--worker-timeout: must be a number of seconds greater than 0/],
    [['--worker-timeout', '9999999'], {}, /^--worker-timeout: must be at most/],
    [['--queue-type', 'stream'], {}, /^--queue-type: must be classic or quorum/],
    [['--max-retries', '-1'], {}, /^--max-retries: must be a whole number of at least 0/],
    [[], { LOG_LEVEL: 'loud' }, /^LOG_LEVEL: must be one of/],
    [[], { WORKERS: 'many' }, /^WORKERS: must be a whole number/],
    [[], { AMQP_URL: 'redis://u:secret@h' }, /^AMQP_URL: must be an amqp/],
  ];
  for (const [argv, env, pattern] of cases) {
    const message = configError(argv, env);
    assert.match(message, pattern);
    assert.doesNotMatch(message, /secret/, 'no password in the error');
  }
});

test('redactUrl hides the password only', () => {
  assert.equal(redactUrl('amqp://user:hunter2@host:5672/vh'), 'amqp://user:***@host:5672/vh');
  assert.equal(redactUrl('amqp://host/'), 'amqp://host/');
  assert.doesNotMatch(redactUrl('garbage://user:hunter2@'), /hunter2/);
});

test('defaultPrefetch: 32 per worker, at most 1000', () => {
  assert.deepEqual([1, 2, 4, 100].map(defaultPrefetch), [32, 64, 128, 1000]);
});

test('argv edge cases: values that look like options, order, repeats, short flags', () => {
  assert.equal(config(['--queue', '-x']).queue, '-x', 'a value may start with one dash');
  assert.equal(config(['--queue=--x']).queue, '--x', 'or with two, after =');
  assert.equal(config(['--workers', '2', '--workers=3']).workers, 3, 'the last one counts');
  assert.equal(config(['--amqp_url=amqp://h1,amqp://h2']).amqpUrl, 'amqp://h1,amqp://h2');
  assert.deepEqual(splitUrls(config(['--amqp-url', 'amqp://a, amqp://b']).amqpUrl), ['amqp://a', 'amqp://b']);
  assert.deepEqual(parseConfig(['-V'], {}), { kind: 'version' });
  assert.deepEqual(parseConfig(['--help', '--bogus'], {}), { kind: 'help' }, 'help as soon as it is seen');
  const cases: [string[], RegExp][] = [
    [['--queue', '--workers', '2'], /^--queue: needs a value \(NAME\)$/],
    [['--workers', '-1'], /^--workers: must be a whole number/],
    [['--bogus', '--help'], /^--bogus: unknown option/],
    [['--bogus=1'], /^--bogus: unknown option/],
    [['-x'], /^-x: unexpected argument/],
    [['-hV'], /^-hV: unexpected argument/],
    [['--'], /^--: unknown option/],
    [['--help=yes'], /^--help: takes no value/],
    [['--task_path'], /^--task_path: needs a value \(PATH\)$/],
    [['--worker_timeout=0'], /^--worker_timeout: must be a number of seconds/],
  ];
  for (const [argv, pattern] of cases) assert.match(configError(argv), pattern, argv.join(' '));
});

const SAMPLES: Record<(typeof OPTIONS)[number]['kind'], [string, string]> = {
  count: ['7', '8'],
  count0: ['0', '8'],
  seconds0: ['0.5', '8'],
  seconds: ['0.5', '8'],
  port: ['0', '8'],
  bytes: ['7', '8'],
  string: ['x', 'y'],
  'amqp-url': ['amqp://h1', 'amqps://h2,amqps://h3'],
  level: ['debug', 'silent'],
  'queue-type': ['quorum', 'classic'],
};

test('the options table drives the defaults, env, flags and --help', () => {
  const defaults = config([]);
  const help = helpText();
  for (const o of OPTIONS) {
    if (o.default !== undefined) assert.equal(defaults[o.key], o.default, `default of ${o.flag}`);
    else assert.ok(o.shown, `${o.flag}: a computed default says what it is`);
    const line = help.split('\n').find((l) => l.startsWith(`  ${o.flag} `));
    assert.ok(line, `--help lists ${o.flag}`);
    assert.ok(line.includes(`[${o.env}]`), `--help names ${o.env}`);
    assert.ok(line.includes(shownDefault(o, 'help')), `--help shows the default of ${o.flag}`);
    const [a, b] = SAMPLES[o.kind];
    assert.equal(String(config([], { [o.env]: a })[o.key]), a, `${o.env} is read`);
    assert.equal(String(config([o.flag, b], { [o.env]: a })[o.key]), b, `${o.flag} beats ${o.env}`);
    assert.equal(String(config([`${o.alias ?? o.flag}=${b}`])[o.key]), b, `${o.alias ?? o.flag}=`);
  }
  assert.doesNotMatch(help, /testuser:testuser/, 'no password in --help');
  assert.ok(help.includes(ENV_ONLY.env));
  const prefetch = OPTIONS.find((o) => o.key === 'prefetch');
  assert.match(
    prefetch?.shown ?? '',
    new RegExp(`${MIN_PER_WORKER} to ${MAX_PER_WORKER} per worker`),
    'the prefetch text follows auto-prefetch.ts',
  );
});

test("README's options table is the table in src/config/options.ts", () => {
  const readme = readFileSync(new URL('../../../README.md', import.meta.url), 'utf8').split('\n');
  const start = readme.indexOf(optionsMarkdown().split('\n')[0] as string);
  assert.notEqual(start, -1, "README's options table has the header of optionsMarkdown()");
  let end = start;
  while (readme[end]?.startsWith('|')) end++;
  const inReadme = readme.slice(start, end);
  const inCode = optionsMarkdown().split('\n');
  // Name, env variable and default first, for a readable failure; then the whole row.
  const key = (row: string) => row.split(' | ').slice(0, 3).join(' | ');
  assert.deepEqual(
    inReadme.map(key),
    inCode.map(key),
    "README's options (flag, env, default) differ from OPTIONS in src/config.ts: paste `npm run --silent docs:options`",
  );
  assert.deepEqual(
    inReadme,
    inCode,
    "README's options table differs from OPTIONS in src/config.ts: paste `npm run --silent docs:options`",
  );
});
