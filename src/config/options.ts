// Command-line and environment configuration (README "Options"). A flag beats its env variable,
// which beats the default. Every bad value becomes a ServiceError('ERR_CONFIG') whose
// message is one line naming the flag and the problem; the CLI prints it and exits 2.
//
// OPTIONS below is the one table of options: each entry's flag, seed alias, env variable,
// default, kind (its parser) and help drive parsing, `--help` and README's options table
// (optionsMarkdown(); test/unit/config.test.ts fails when README's copy differs).
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { BROKER_DEFAULTS } from '../amqp/defaults.ts';
import { defaultPrefetch, MAX_PREFETCH, memoryBoundPrefetch } from '../amqp/prefetch.ts';
import { redactUrl, splitUrls } from '../amqp/url.ts';
import { ServiceError } from '../errors.ts';
import { type ArgvSpec, tokenize } from '../util/argv.ts';
import { memoryLimitBytes } from '../util/memory.ts';

export interface Config {
  workers: number;
  taskPath: string;
  workerTimeout: number; // seconds
  amqpUrl: string;
  /** --amqp-url or AMQP_URL was given; else the default accounts are tried (amqp/defaults.ts). */
  amqpUrlGiven: boolean;
  exchange: string;
  queue: string;
  routingKey: string;
  /** The prefetch to start with; it stays fixed when given, else follows the tasks (prefetchAuto). */
  prefetch: number;
  /** No prefetch given: it follows the measured task duration (see auto-prefetch.ts). */
  prefetchAuto: boolean;
  httpHost: string;
  httpPort: number;
  shutdownTimeout: number; // seconds
  connectTimeout: number; // seconds: each step of getting a broker session up
  shutdownToken: string | undefined;
  maxMessageBytes: number;
  logLevel: string;
  maxRetries: number;
  retryDelay: number; // seconds, doubled per attempt
  retryDelayMax: number; // seconds
  queueType: 'classic' | 'quorum';
  deliveryLimit: number;
  /** Classic queues: x-max-priority of the work queue (0: no priorities). */
  maxPriority: number;
  killGrace: number; // seconds; 0: SIGKILL at the time limit
  maxTasksPerWorker: number; // 0: never recycle by count
  maxWorkerMemory: number; // MB; 0: never recycle by memory
  /** The most workers --workers, SIGTTIN and PUT /workers may ask for. */
  maxWorkers: number;
  /** The largest result (bytes of JSON) a task may return for a reply. */
  maxResultBytes: number;
  /** The bytes of message bodies the master may hold in flight before consuming pauses. */
  maxHeldBytes: number;
  /** Where the service keeps its state between restarts (the crash journal), in a private folder. */
  stateDir: string;
}

export type ParseResult = { kind: 'run'; config: Config } | { kind: 'help' } | { kind: 'version' };

export const DEFAULT_TASK_PATH = fileURLToPath(new URL('../../tasks/index.ts', import.meta.url));

/** AMQP's basic.qos prefetch-count is a 16-bit number: the broker refuses more. */
const MAX_AMQP_PREFETCH = 65_535;
/** RabbitMQ's largest max_message_size (512 MiB). */
const MAX_BROKER_MESSAGE_BYTES = 512 * 1024 * 1024;
/** The most workers any setting allows, whatever the memory. */
const MAX_WORKERS_CEILING = 1_024;
/** A worker's resident memory, measured (Node.js 24, an idle child: about 90 MB), rounded up. */
export const WORKER_RSS_MB = 100;
/** What the master keeps for itself before workers are counted. */
const MASTER_RESERVE_MB = 256;

/** --max-workers when not given: as many workers as the memory holds, 1 to MAX_WORKERS_CEILING. */
export function derivedMaxWorkers(memoryBytes = memoryLimitBytes()): number {
  const mb = memoryBytes / (1024 * 1024);
  return Math.max(1, Math.min(MAX_WORKERS_CEILING, Math.floor((mb - MASTER_RESERVE_MB) / WORKER_RSS_MB)));
}

type Kind =
  | 'count'
  | 'count0'
  | 'seconds0'
  | 'port'
  | 'seconds'
  | 'string'
  | 'amqp-url'
  | 'bytes'
  | 'level'
  | 'queue-type';

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export interface OptionSpec {
  key: Exclude<keyof Config, 'shutdownToken' | 'prefetchAuto' | 'amqpUrlGiven'>;
  flag: string;
  alias?: string; // the Python tool's underscore spelling
  env: string;
  kind: Kind;
  arg: string; // placeholder in --help and README
  /** The value when neither flag nor env gives one; none for a default that is computed. */
  default?: string | number;
  /** Shown instead of the default value, in --help and README. */
  shown?: string;
  /** Said after the default value: `0: never`. */
  note?: string;
  /** The largest value accepted (counts and sizes). */
  max?: number;
  help: string;
}

export const OPTIONS: readonly OptionSpec[] = [
  {
    key: 'workers',
    flag: '--workers',
    env: 'WORKERS',
    kind: 'count',
    arg: 'N',
    default: 1,
    max: MAX_WORKERS_CEILING,
    help: 'worker processes (at most --max-workers)',
  },
  {
    key: 'taskPath',
    flag: '--task-path',
    alias: '--task_path',
    env: 'TASK_PATH',
    kind: 'string',
    arg: 'PATH',
    default: DEFAULT_TASK_PATH,
    shown: "the project's tasks/",
    help: 'module whose exported functions are the tasks',
  },
  {
    key: 'workerTimeout',
    flag: '--worker-timeout',
    alias: '--worker_timeout',
    env: 'WORKER_TIMEOUT',
    kind: 'seconds',
    arg: 'SECONDS',
    default: 30,
    help: 'time limit of one task; the worker is killed and replaced past it',
  },
  {
    key: 'amqpUrl',
    flag: '--amqp-url',
    alias: '--amqp_url',
    env: 'AMQP_URL',
    kind: 'amqp-url',
    arg: 'URL',
    default: BROKER_DEFAULTS.url,
    shown: "testuser on localhost:5672, then RabbitMQ's own guest account there",
    help: 'broker URL, amqp:// or amqps://; a comma-separated list for a cluster, tried in a shuffled order',
  },
  {
    key: 'exchange',
    flag: '--exchange',
    env: 'EXCHANGE',
    kind: 'string',
    arg: 'NAME',
    default: BROKER_DEFAULTS.exchange,
    help: 'durable direct exchange',
  },
  {
    key: 'queue',
    flag: '--queue',
    env: 'QUEUE',
    kind: 'string',
    arg: 'NAME',
    default: BROKER_DEFAULTS.queue,
    help: 'durable work queue; dead letters go to NAME.dead',
  },
  {
    key: 'routingKey',
    flag: '--routing-key',
    env: 'ROUTING_KEY',
    kind: 'string',
    arg: 'KEY',
    default: BROKER_DEFAULTS.routingKey,
    help: 'binding key of the queue',
  },
  {
    key: 'prefetch',
    flag: '--prefetch',
    env: 'PREFETCH',
    kind: 'count',
    arg: 'N',
    // Computed: defaultPrefetch(workers), then auto-prefetch.ts (MIN/MAX_PER_WORKER).
    shown: `automatic: about 1 s of work per worker at the measured task duration (2 to 256 per worker, at most ${MAX_PREFETCH}; ${defaultPrefetch(1)} per worker until tasks are timed; within --max-held-bytes at the average body, or the largest before any is seen)`,
    max: MAX_AMQP_PREFETCH,
    help: 'unacknowledged deliveries held at once; when given, it stays fixed',
  },
  {
    key: 'httpHost',
    flag: '--http-host',
    env: 'HTTP_HOST',
    kind: 'string',
    arg: 'HOST',
    default: '0.0.0.0',
    help: 'address of the HTTP server',
  },
  {
    key: 'httpPort',
    flag: '--http-port',
    env: 'HTTP_PORT',
    kind: 'port',
    arg: 'PORT',
    default: 8080,
    help: 'port of the HTTP server, 0 for any free port',
  },
  {
    key: 'shutdownTimeout',
    flag: '--shutdown-timeout',
    env: 'SHUTDOWN_TIMEOUT',
    kind: 'seconds',
    arg: 'SECONDS',
    default: 30,
    help: 'how long running tasks may finish during a drain',
  },
  {
    key: 'connectTimeout',
    flag: '--connect-timeout',
    env: 'CONNECT_TIMEOUT',
    kind: 'seconds',
    arg: 'SECONDS',
    default: 10,
    help: 'deadline of each step of reaching the broker (TCP connect, AMQP handshake, channel, declarations, consume); past it the attempt is dropped and retried',
  },
  {
    key: 'maxMessageBytes',
    flag: '--max-message-bytes',
    env: 'MAX_MESSAGE_BYTES',
    kind: 'bytes',
    arg: 'BYTES',
    default: 1024 * 1024,
    max: MAX_BROKER_MESSAGE_BYTES,
    help: "larger bodies are dead-lettered as rejected; set the broker's max_message_size near it",
  },
  {
    key: 'maxResultBytes',
    flag: '--max-result-bytes',
    env: 'MAX_RESULT_BYTES',
    kind: 'bytes',
    arg: 'BYTES',
    shown: '--max-message-bytes',
    max: MAX_BROKER_MESSAGE_BYTES,
    help: 'a larger result (as JSON) fails its task, and the reply says so',
  },
  {
    key: 'maxHeldBytes',
    flag: '--max-held-bytes',
    env: 'MAX_HELD_BYTES',
    kind: 'bytes',
    arg: 'BYTES',
    shown: '64 MiB, or 4 x --max-message-bytes when that is more',
    max: 64 * 1024 * 1024 * 1024,
    help: 'the bodies of the messages held in flight, in all; past it consuming pauses, and resumes under half',
  },
  {
    key: 'maxWorkers',
    flag: '--max-workers',
    env: 'MAX_WORKERS',
    kind: 'count',
    arg: 'N',
    shown: `derived from memory: the container's limit (else the machine's), less ${MASTER_RESERVE_MB} MB for the master, at ${WORKER_RSS_MB} MB a worker`,
    max: MAX_WORKERS_CEILING,
    help: 'caps --workers, SIGTTIN and PUT /workers; a resize past it is refused, and workers start a few at a time',
  },
  {
    key: 'stateDir',
    flag: '--state-dir',
    env: 'STATE_DIR',
    kind: 'string',
    arg: 'DIR',
    default: tmpdir(),
    shown: "the system's temporary folder",
    help: 'where the crash journal is kept between restarts, in a folder of its own (mode 0700)',
  },
  {
    key: 'maxRetries',
    flag: '--max-retries',
    env: 'MAX_RETRIES',
    kind: 'count0',
    arg: 'N',
    default: 0,
    max: 1_000,
    help: 'runs again after a failure, timeout or crash before the message is dead-lettered',
  },
  {
    key: 'retryDelay',
    flag: '--retry-delay',
    env: 'RETRY_DELAY',
    kind: 'seconds',
    arg: 'SECONDS',
    default: 1,
    help: 'wait before the first retry; doubles with each attempt',
  },
  {
    key: 'retryDelayMax',
    flag: '--retry-delay-max',
    env: 'RETRY_DELAY_MAX',
    kind: 'seconds',
    arg: 'SECONDS',
    default: 300,
    help: 'cap of the retry wait',
  },
  {
    key: 'queueType',
    flag: '--queue-type',
    env: 'QUEUE_TYPE',
    kind: 'queue-type',
    arg: 'TYPE',
    default: 'classic',
    help: 'classic, or quorum for a RabbitMQ cluster',
  },
  {
    key: 'deliveryLimit',
    flag: '--delivery-limit',
    env: 'DELIVERY_LIMIT',
    kind: 'count',
    arg: 'N',
    default: 10,
    max: 2 ** 31 - 1,
    help: 'quorum queues: give-backs the broker allows before it dead-letters a message itself (a limit of N means up to N+1 runs)',
  },
  {
    key: 'maxPriority',
    flag: '--max-priority',
    env: 'MAX_PRIORITY',
    kind: 'count0',
    arg: 'N',
    default: 0,
    note: 'off',
    max: 255,
    help: "classic queues: the work queue's x-max-priority (RabbitMQ advises at most 10); quorum queues have the broker's two levels. Either way the master runs higher priorities first",
  },
  {
    key: 'killGrace',
    flag: '--kill-grace',
    env: 'KILL_GRACE',
    kind: 'seconds0',
    arg: 'SECONDS',
    default: 0,
    note: 'at once',
    help: "at the time limit the task's AbortSignal fires; SIGKILL follows after this grace",
  },
  {
    key: 'maxTasksPerWorker',
    flag: '--max-tasks-per-worker',
    env: 'MAX_TASKS_PER_WORKER',
    kind: 'count0',
    arg: 'N',
    default: 0,
    note: 'never',
    help: 'replace a worker after N tasks, between tasks',
  },
  {
    key: 'maxWorkerMemory',
    flag: '--max-worker-memory',
    env: 'MAX_WORKER_MEMORY',
    kind: 'count0',
    arg: 'MB',
    default: 0,
    note: 'never',
    max: 1024 * 1024,
    help: 'replace a worker whose RSS passes MB, checked between tasks',
  },
  {
    key: 'logLevel',
    flag: '--log-level',
    env: 'LOG_LEVEL',
    kind: 'level',
    arg: 'LEVEL',
    default: 'info',
    help: `${LEVELS.slice(0, -1).join(', ')} or ${LEVELS.at(-1)}`,
  },
];

/** Read from the environment only (a secret does not belong on a command line). */
export const ENV_ONLY = {
  env: 'SHUTDOWN_TOKEN',
  shown: 'unset: POST /shutdown is disabled',
  help: 'enables POST /shutdown for requests with the header Authorization: Bearer TOKEN',
} as const;

const BY_NAME = new Map<string, OptionSpec>(
  OPTIONS.flatMap((o) =>
    o.alias === undefined
      ? [[o.flag, o]]
      : [
          [o.flag, o],
          [o.alias, o],
        ],
  ),
);

/** The service's argv: every option by its name and alias, with --help/-h and --version/-V. */
const ARGV_SPEC: ArgvSpec = {
  valued: new Map([...BY_NAME].map(([name, spec]) => [name, spec.arg])),
  booleans: new Set(['--help', '--version']),
  shorts: new Map([
    ['-h', '--help'],
    ['-V', '--version'],
  ]),
};

/** How an option's default reads: in --help (passwords hidden) or in README's markdown. */
export function shownDefault(spec: OptionSpec, where: 'help' | 'markdown'): string {
  let text = spec.shown;
  if (text === undefined) {
    const value = spec.default;
    if (typeof value === 'number') text = String(value);
    else if (where === 'help') text = spec.kind === 'amqp-url' ? redactUrl(String(value)) : String(value);
    else text = `\`${value}\``;
  }
  return spec.note === undefined ? text : `${text}: ${spec.note}`;
}

function fail(name: string, problem: string): never {
  throw new ServiceError('ERR_CONFIG', `${name}: ${problem}`);
}

function convert(spec: OptionSpec, name: string, raw: string): string | number {
  const shown = JSON.stringify(raw);
  switch (spec.kind) {
    case 'count': {
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of at least 1 (got ${shown})`);
      if (Number(raw) > max) fail(name, `must be a whole number from 1 to ${max} (got ${shown})`);
      return Number(raw);
    }
    case 'seconds0': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || n < 0 || n * 1000 > 2 ** 31 - 1)
        fail(name, `must be a number of seconds, 0 or more (got ${shown})`);
      return n;
    }
    case 'count0': {
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (!/^\d+$/.test(raw.trim()) || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of at least 0 (got ${shown})`);
      if (Number(raw) > max) fail(name, `must be a whole number from 0 to ${max} (got ${shown})`);
      return Number(raw);
    }
    case 'queue-type': {
      if (raw !== 'classic' && raw !== 'quorum') fail(name, `must be classic or quorum (got ${shown})`);
      return raw;
    }
    case 'bytes': {
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of bytes, at least 1 (got ${shown})`);
      if (Number(raw) > max) fail(name, `must be a whole number of bytes from 1 to ${max} (got ${shown})`);
      return Number(raw);
    }
    case 'port': {
      const n = Number(raw);
      if (!/^\d+$/.test(raw.trim()) || n > 65535)
        fail(name, `must be a port number from 0 to 65535 (got ${shown})`);
      return n;
    }
    case 'seconds': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || n <= 0)
        fail(name, `must be a number of seconds greater than 0 (got ${shown})`);
      // setTimeout holds at most 2^31-1 ms (about 24.8 days); past that it fires at once.
      if (n * 1000 > 2 ** 31 - 1) fail(name, `must be at most 2147483 seconds (got ${shown})`);
      return n;
    }
    case 'amqp-url': {
      for (const one of splitUrls(raw)) {
        let url: URL;
        try {
          url = new URL(one);
        } catch {
          fail(name, `is not a URL (got ${JSON.stringify(redactUrl(one))})`);
        }
        if (url.protocol !== 'amqp:' && url.protocol !== 'amqps:')
          fail(name, `must be an amqp:// or amqps:// URL (got ${url.protocol}//...)`);
        if (url.hostname === '') fail(name, 'has no host');
      }
      if (splitUrls(raw).length === 0) fail(name, 'must not be empty');
      return raw;
    }
    case 'level': {
      if (!(LEVELS as readonly string[]).includes(raw))
        fail(name, `must be one of ${LEVELS.join(', ')} (got ${shown})`);
      return raw;
    }
    case 'string': {
      if (raw === '') fail(name, 'must not be empty');
      return raw;
    }
  }
}

/** Parses argv (without node and the script) and env into a Config, or help/version. */
export function parseConfig(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): ParseResult {
  const fromFlags = new Map<OptionSpec, { name: string; raw: string }>();
  for (const token of tokenize(argv, ARGV_SPEC)) {
    if (token.kind === 'terminator') fail('--', 'unknown option (see --help)');
    if (token.kind === 'word') fail(token.text, 'unexpected argument (options start with --; see --help)');
    if (token.kind === 'flag') return { kind: token.name === '--help' ? 'help' : 'version' };
    fromFlags.set(BY_NAME.get(token.name) as OptionSpec, { name: token.name, raw: token.value });
  }

  const values: Record<string, string | number> = {};
  /** How each value given was named (a flag, or its env variable), for cross-checks' errors. */
  const givenAs = new Map<OptionSpec['key'], string>();
  let prefetchGiven = false;
  let amqpUrlGiven = false;
  for (const spec of OPTIONS) {
    const flag = fromFlags.get(spec);
    const envRaw = env[spec.env];
    if (flag !== undefined) {
      values[spec.key] = convert(spec, flag.name, flag.raw);
      givenAs.set(spec.key, flag.name);
    } else if (envRaw !== undefined && envRaw !== '') {
      values[spec.key] = convert(spec, spec.env, envRaw);
      givenAs.set(spec.key, spec.env);
    } else {
      if (spec.default !== undefined) values[spec.key] = spec.default;
      continue;
    }
    if (spec.key === 'prefetch') prefetchGiven = true;
    if (spec.key === 'amqpUrl') amqpUrlGiven = true;
  }
  const config = values as unknown as Config;
  config.prefetchAuto = !prefetchGiven;
  config.amqpUrlGiven = amqpUrlGiven;
  if (!prefetchGiven) config.prefetch = defaultPrefetch(config.workers);
  config.maxResultBytes ??= config.maxMessageBytes;
  config.maxHeldBytes ??= Math.max(64 * 1024 * 1024, 4 * config.maxMessageBytes);
  // Before any body is seen, the largest one accepted must fit the window in the budget.
  if (!prefetchGiven)
    config.prefetch = memoryBoundPrefetch(config.prefetch, config.maxHeldBytes, config.maxMessageBytes);
  const maxWorkersAs = givenAs.get('maxWorkers');
  config.maxWorkers ??= derivedMaxWorkers();
  if (config.workers > config.maxWorkers)
    fail(
      givenAs.get('workers') ?? '--workers',
      `must be at most ${config.maxWorkers} (${maxWorkersAs === undefined ? "--max-workers, derived from this machine's memory" : maxWorkersAs}; got ${config.workers})`,
    );
  const token = env[ENV_ONLY.env];
  config.shutdownToken = token === undefined || token === '' ? undefined : token;
  return { kind: 'run', config };
}

export function helpText(): string {
  const lines = [
    'Usage: amqp-concurrency [options]           run the service',
    '       amqp-concurrency publish FUNC [ARGS]  send a task (see publish --help)',
    '       amqp-concurrency status               show the workers (see status --help)',
    '',
    'Options (each also read from the env variable shown):',
  ];
  for (const o of OPTIONS) {
    const left = `  ${o.flag} ${o.arg}`.padEnd(32);
    const colon = o.shown === undefined ? '' : ':'; // (default 30), (default: automatic...)
    lines.push(`${left}${o.help} (default${colon} ${shownDefault(o, 'help')})  [${o.env}]`);
  }
  lines.push(
    `${'  --help, -h'.padEnd(32)}print this help`,
    `${'  --version, -V'.padEnd(32)}print the version`,
    '',
    `${ENV_ONLY.env} (env only) ${ENV_ONLY.help}.`,
    `The Python tool's spellings ${OPTIONS.flatMap((o) => o.alias ?? []).join(', ')} are accepted too.`,
  );
  return lines.join('\n');
}

/**
 * README's options table, made from OPTIONS: flag (and the Python tool's spelling), env
 * variable, default, what it does. `npm run docs:options` prints it.
 */
export function optionsMarkdown(): string {
  const cell = (text: string) => text.replaceAll('|', '\\|');
  const rows = [
    "| flag (the Python tool's spelling also works) | env | default | what it does |",
    '| --- | --- | --- | --- |',
  ];
  for (const o of OPTIONS) {
    const flag = `\`${o.flag} ${o.arg}\`${o.alias === undefined ? '' : ` (\`${o.alias}\`)`}`;
    rows.push(`| ${cell(flag)} | \`${o.env}\` | ${cell(shownDefault(o, 'markdown'))} | ${cell(o.help)} |`);
  }
  rows.push(`| (none) | \`${ENV_ONLY.env}\` | ${cell(ENV_ONLY.shown)} | ${cell(ENV_ONLY.help)} |`);
  return rows.join('\n');
}
