// The one table of options (README "Options"): each entry's flag, the Python tool's
// spelling, env variable, default, kind (its parser) and help. options.ts reads it to parse
// argv and env, to print --help and to write README's options table; nothing here parses.
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { BROKER_DEFAULTS } from '../amqp/defaults.ts';
import { defaultPrefetch, MAX_PER_WORKER, MAX_PREFETCH, MIN_PER_WORKER } from '../amqp/prefetch.ts';
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

export const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

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
    shown: `automatic: about 1 s of work per worker at the measured task duration (${MIN_PER_WORKER} to ${MAX_PER_WORKER} per worker, at most ${MAX_PREFETCH}; ${defaultPrefetch(1)} per worker until tasks are timed; within --max-held-bytes at the average body, or the largest before any is seen)`,
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
