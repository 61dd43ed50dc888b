// Command-line and environment configuration (SPEC §1). A flag beats its env variable,
// which beats the default. Every bad value becomes a ServiceError('ERR_CONFIG') whose
// message is one line naming the flag and the problem; the CLI prints it and exits 2.
import { fileURLToPath } from 'node:url';
import { ServiceError } from './errors.ts';

export interface Config {
  workers: number;
  taskPath: string;
  workerTimeout: number; // seconds
  amqpUrl: string;
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
  killGrace: number; // seconds; 0: SIGKILL at the time limit
  maxTasksPerWorker: number; // 0: never recycle by count
  maxWorkerMemory: number; // MB; 0: never recycle by memory
}

export type ParseResult = { kind: 'run'; config: Config } | { kind: 'help' } | { kind: 'version' };

export const DEFAULT_TASK_PATH = fileURLToPath(new URL('../tasks/index.ts', import.meta.url));
export const DEFAULT_AMQP_URL = 'amqp://testuser:testuser@localhost:5672/';

/** The most deliveries one instance holds at once, however the prefetch is chosen. */
export const MAX_PREFETCH = 1_000;

/**
 * The prefetch to start with when none is given, before any task has been timed: enough
 * deliveries waiting in the master that a worker finishing a task finds the next one at
 * once, bounded so that one instance does not hoard messages that another instance could
 * run. From then on it follows the task duration (auto-prefetch.ts).
 */
export function defaultPrefetch(workers: number): number {
  return Math.min(MAX_PREFETCH, workers * 32);
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

interface OptionSpec {
  key: Exclude<keyof Config, 'shutdownToken'>;
  flag: string;
  alias?: string; // the Python tool's underscore spelling
  env: string;
  kind: Kind;
  arg: string; // placeholder in --help
  help: string;
}

const OPTIONS: readonly OptionSpec[] = [
  {
    key: 'workers',
    flag: '--workers',
    env: 'WORKERS',
    kind: 'count',
    arg: 'N',
    help: 'worker processes (default 1)',
  },
  {
    key: 'taskPath',
    flag: '--task-path',
    alias: '--task_path',
    env: 'TASK_PATH',
    kind: 'string',
    arg: 'PATH',
    help: "module whose exported functions are the tasks (default: the project's tasks/)",
  },
  {
    key: 'workerTimeout',
    flag: '--worker-timeout',
    alias: '--worker_timeout',
    env: 'WORKER_TIMEOUT',
    kind: 'seconds',
    arg: 'SECONDS',
    help: 'time limit of one task; the worker is killed and replaced past it (default 30)',
  },
  {
    key: 'amqpUrl',
    flag: '--amqp-url',
    alias: '--amqp_url',
    env: 'AMQP_URL',
    kind: 'amqp-url',
    arg: 'URL',
    help: `broker URL, amqp:// or amqps://; a comma-separated list for a cluster, tried in a shuffled order (default ${redactUrl(DEFAULT_AMQP_URL)})`,
  },
  {
    key: 'exchange',
    flag: '--exchange',
    env: 'EXCHANGE',
    kind: 'string',
    arg: 'NAME',
    help: 'durable direct exchange (default curio_amqp_exchange)',
  },
  {
    key: 'queue',
    flag: '--queue',
    env: 'QUEUE',
    kind: 'string',
    arg: 'NAME',
    help: 'durable work queue; dead letters go to NAME.dead (default curio_amqp_queue)',
  },
  {
    key: 'routingKey',
    flag: '--routing-key',
    env: 'ROUTING_KEY',
    kind: 'string',
    arg: 'KEY',
    help: 'binding key of the queue (default curio_amqp)',
  },
  {
    key: 'prefetch',
    flag: '--prefetch',
    env: 'PREFETCH',
    kind: 'count',
    arg: 'N',
    help: 'unacknowledged deliveries held at once (default: about 1 s of work per worker, by the measured task duration; 32 per worker until measured; at most 1000)',
  },
  {
    key: 'httpHost',
    flag: '--http-host',
    env: 'HTTP_HOST',
    kind: 'string',
    arg: 'HOST',
    help: 'address of the HTTP server (default 0.0.0.0)',
  },
  {
    key: 'httpPort',
    flag: '--http-port',
    env: 'HTTP_PORT',
    kind: 'port',
    arg: 'PORT',
    help: 'port of the HTTP server, 0 for any free port (default 8080)',
  },
  {
    key: 'shutdownTimeout',
    flag: '--shutdown-timeout',
    env: 'SHUTDOWN_TIMEOUT',
    kind: 'seconds',
    arg: 'SECONDS',
    help: 'how long running tasks may finish during a drain (default 30)',
  },
  {
    key: 'connectTimeout',
    flag: '--connect-timeout',
    env: 'CONNECT_TIMEOUT',
    kind: 'seconds',
    arg: 'SECONDS',
    help: 'deadline of each step of reaching the broker (TCP connect, AMQP handshake, channel, declarations, consume); past it the attempt is dropped and retried (default 10)',
  },
  {
    key: 'maxMessageBytes',
    flag: '--max-message-bytes',
    env: 'MAX_MESSAGE_BYTES',
    kind: 'bytes',
    arg: 'BYTES',
    help: 'larger bodies are dead-lettered as rejected (default 1048576)',
  },
  {
    key: 'maxRetries',
    flag: '--max-retries',
    env: 'MAX_RETRIES',
    kind: 'count0',
    arg: 'N',
    help: 'runs again after a failure, timeout or crash before the message is dead-lettered (default 0)',
  },
  {
    key: 'retryDelay',
    flag: '--retry-delay',
    env: 'RETRY_DELAY',
    kind: 'seconds',
    arg: 'SECONDS',
    help: 'wait before the first retry; doubles with each attempt (default 1)',
  },
  {
    key: 'retryDelayMax',
    flag: '--retry-delay-max',
    env: 'RETRY_DELAY_MAX',
    kind: 'seconds',
    arg: 'SECONDS',
    help: 'cap of the retry wait (default 300)',
  },
  {
    key: 'queueType',
    flag: '--queue-type',
    env: 'QUEUE_TYPE',
    kind: 'queue-type',
    arg: 'TYPE',
    help: 'classic, or quorum for a RabbitMQ cluster (default classic)',
  },
  {
    key: 'deliveryLimit',
    flag: '--delivery-limit',
    env: 'DELIVERY_LIMIT',
    kind: 'count',
    arg: 'N',
    help: 'quorum queues: deliveries before the broker dead-letters a message that kills its master (default 10)',
  },
  {
    key: 'killGrace',
    flag: '--kill-grace',
    env: 'KILL_GRACE',
    kind: 'seconds0',
    arg: 'SECONDS',
    help: "at the time limit the task's AbortSignal fires; SIGKILL follows after this grace (default 0: at once)",
  },
  {
    key: 'maxTasksPerWorker',
    flag: '--max-tasks-per-worker',
    env: 'MAX_TASKS_PER_WORKER',
    kind: 'count0',
    arg: 'N',
    help: 'replace a worker after N tasks, between tasks (default 0: never)',
  },
  {
    key: 'maxWorkerMemory',
    flag: '--max-worker-memory',
    env: 'MAX_WORKER_MEMORY',
    kind: 'count0',
    arg: 'MB',
    help: 'replace a worker whose RSS passes MB, checked between tasks (default 0: never)',
  },
  {
    key: 'logLevel',
    flag: '--log-level',
    env: 'LOG_LEVEL',
    kind: 'level',
    arg: 'LEVEL',
    help: 'fatal, error, warn, info, debug, trace or silent (default info)',
  },
];

const DEFAULTS: Omit<Config, 'prefetch' | 'prefetchAuto' | 'shutdownToken'> = {
  workers: 1,
  taskPath: DEFAULT_TASK_PATH,
  workerTimeout: 30,
  amqpUrl: DEFAULT_AMQP_URL,
  exchange: 'curio_amqp_exchange',
  queue: 'curio_amqp_queue',
  routingKey: 'curio_amqp',
  httpHost: '0.0.0.0',
  httpPort: 8080,
  shutdownTimeout: 30,
  connectTimeout: 10,
  maxMessageBytes: 1024 * 1024,
  logLevel: 'info',
  maxRetries: 0,
  retryDelay: 1,
  retryDelayMax: 300,
  queueType: 'classic',
  deliveryLimit: 10,
  killGrace: 0,
  maxTasksPerWorker: 0,
  maxWorkerMemory: 0,
};

const LEVELS = new Set(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']);

function fail(name: string, problem: string): never {
  throw new ServiceError('ERR_CONFIG', `${name}: ${problem}`);
}

function convert(spec: OptionSpec, name: string, raw: string): string | number {
  const shown = JSON.stringify(raw);
  switch (spec.kind) {
    case 'count': {
      if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of at least 1 (got ${shown})`);
      return Number(raw);
    }
    case 'seconds0': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || n < 0 || n * 1000 > 2 ** 31 - 1)
        fail(name, `must be a number of seconds, 0 or more (got ${shown})`);
      return n;
    }
    case 'count0': {
      if (!/^\d+$/.test(raw.trim()) || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of at least 0 (got ${shown})`);
      return Number(raw);
    }
    case 'queue-type': {
      if (raw !== 'classic' && raw !== 'quorum') fail(name, `must be classic or quorum (got ${shown})`);
      return raw;
    }
    case 'bytes': {
      if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of bytes, at least 1 (got ${shown})`);
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
      if (!LEVELS.has(raw)) fail(name, `must be one of ${[...LEVELS].join(', ')} (got ${shown})`);
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
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--help' || arg === '-h') return { kind: 'help' };
    if (arg === '--version' || arg === '-V') return { kind: 'version' };
    if (!arg.startsWith('--')) fail(arg, 'unexpected argument (options start with --; see --help)');
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    const spec = OPTIONS.find((o) => o.flag === name || o.alias === name);
    if (spec === undefined) fail(name, 'unknown option (see --help)');
    let raw: string;
    if (eq !== -1) raw = arg.slice(eq + 1);
    else {
      const next = argv[i + 1];
      if (next === undefined || (next.startsWith('--') && next.length > 2))
        fail(name, `needs a value (${spec.arg})`);
      raw = next;
      i++;
    }
    fromFlags.set(spec, { name, raw });
  }

  const values: Record<string, string | number> = { ...DEFAULTS };
  let prefetchGiven = false;
  for (const spec of OPTIONS) {
    const flag = fromFlags.get(spec);
    const envRaw = env[spec.env];
    if (flag !== undefined) values[spec.key] = convert(spec, flag.name, flag.raw);
    else if (envRaw !== undefined && envRaw !== '') values[spec.key] = convert(spec, spec.env, envRaw);
    else continue;
    if (spec.key === 'prefetch') prefetchGiven = true;
  }
  const config = values as unknown as Config;
  config.prefetchAuto = !prefetchGiven;
  if (!prefetchGiven) config.prefetch = defaultPrefetch(config.workers);
  const token = env.SHUTDOWN_TOKEN;
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
    lines.push(`${left}${o.help}  [${o.env}]`);
  }
  lines.push(
    `${'  --help'.padEnd(32)}print this help`,
    `${'  --version'.padEnd(32)}print the version`,
    '',
    'SHUTDOWN_TOKEN (env only) enables POST /shutdown with Authorization: Bearer <token>.',
    "The Python tool's spellings --task_path, --worker_timeout and --amqp_url are accepted too.",
  );
  return lines.join('\n');
}

/** The broker URLs of a --amqp-url value: one, or a comma-separated list (a cluster). */
export function splitUrls(raw: string): string[] {
  return raw
    .split(',')
    .map((u) => u.trim())
    .filter((u) => u !== '');
}

/** The URL(s) with passwords replaced, for logs, errors and /health. */
export function redactUrl(raw: string): string {
  if (raw.includes(',')) return splitUrls(raw).map(redactUrl).join(',');
  try {
    const url = new URL(raw);
    if (url.password !== '') url.password = '***';
    return url.toString();
  } catch {
    return raw.replace(/\/\/([^:/@]*):[^@/]*@/, '//$1:***@');
  }
}
