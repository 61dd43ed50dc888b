// The service whole: pool, consuming and publishing connections, dispatcher, metrics and
// HTTP, built from a Config. It never touches `process`: the CLI owns signals and exit
// codes, so tests can build and stop a service in-process.

import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { Registry } from 'prom-client';
import { AmqpConsumer } from './amqp-consumer.ts';
import { AmqpPublisher } from './amqp-publisher.ts';
import { AutoPrefetch, MAX_PER_WORKER } from './auto-prefetch.ts';
import { type Config, MAX_PREFETCH, redactUrl, splitUrls } from './config.ts';
import { consumerTimeoutFor } from './consumer-timeout.ts';
import { CrashJournal } from './crash-journal.ts';
import { Dispatcher } from './dispatcher.ts';
import { ServiceError } from './errors.ts';
import { buildServer, type HealthReport, type StatusReport } from './http.ts';
import { createMetrics, type Metrics } from './metrics.ts';
import { WorkerPool } from './pool.ts';
import { deadLetterQueueName, retryDelays, type Topology } from './topology.ts';

export interface ServiceOptions {
  config: Config;
  /** The task module as a file URL (see resolveTaskModule). */
  moduleUrl: string;
  logger: Logger;
  registry?: Registry;
  /** How long one dead-letter, retry or reply publish may keep trying (default 60 s; time blocked by an alarm not counted). */
  publishTimeoutMs?: number;
  /** Where the crash journal lives (default: see crashJournalPath). */
  crashJournalPath?: string;
}

/** Deaths of the master while handling one message before it is dead-lettered as crashed. */
export const CRASH_LIMIT = 3;

/**
 * The crash journal's file: per queue, in the temporary directory, which survives a
 * restart of the process and of its container (not a new container: see README).
 */
export function crashJournalPath(queue: string): string {
  return join(tmpdir(), 'amqp-concurrency', `${encodeURIComponent(queue)}.crashes.json`);
}

/** How the service ended: the exit code the CLI should use, and why. */
export interface Ending {
  code: number;
  reason: string;
  /** The error that stopped the service, when one did. */
  error?: ServiceError;
}

/** Whether `promise` settled within `ms`. */
async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), Math.max(0, ms));
  });
  try {
    return await Promise.race([promise.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

export class Service {
  readonly config: Config;
  readonly metrics: Metrics;
  readonly pool: WorkerPool;
  readonly consumer: AmqpConsumer;
  readonly publisher: AmqpPublisher;
  readonly dispatcher: Dispatcher;
  readonly http: FastifyInstance;
  /** Present when no prefetch was given: the window follows the task duration. */
  readonly #autoPrefetch: AutoPrefetch | undefined;
  readonly #log: Logger;
  #draining: Promise<Ending> | undefined;
  #resolveEnded: (ending: Ending) => void = () => {};
  /** Resolves when the service has stopped, by a drain or a fatal error. */
  readonly ended: Promise<Ending>;

  constructor(opts: ServiceOptions) {
    const { config, logger } = opts;
    this.config = config;
    this.#log = logger;
    this.ended = new Promise((resolve) => {
      this.#resolveEnded = resolve;
    });
    this.pool = new WorkerPool({
      size: config.workers,
      moduleUrl: opts.moduleUrl,
      taskTimeoutMs: config.workerTimeout * 1000,
      killGraceMs: config.killGrace * 1000,
      maxTasksPerWorker: config.maxTasksPerWorker,
      maxWorkerMemoryBytes: config.maxWorkerMemory * 1024 * 1024,
      logger,
    });
    const urls = splitUrls(config.amqpUrl);
    const connectTimeoutMs = config.connectTimeout * 1000;
    const topology: Topology = {
      exchange: config.exchange,
      queue: config.queue,
      routingKey: config.routingKey,
      queueType: config.queueType,
      deliveryLimit: config.deliveryLimit,
      retryDelaysMs: retryDelays(config.maxRetries, config.retryDelay * 1000, config.retryDelayMax * 1000),
    };
    this.publisher = new AmqpPublisher({
      urls,
      connectTimeoutMs,
      topology,
      logger,
      ...(opts.publishTimeoutMs === undefined ? {} : { publishTimeoutMs: opts.publishTimeoutMs }),
    });
    this.consumer = new AmqpConsumer({
      urls,
      connectTimeoutMs,
      topology,
      prefetch: config.prefetch,
      logger,
      onDelivery: (delivery) => this.dispatcher.handle(delivery),
      // Past the longest a delivery can wait here: the broker's own timeout never fires
      // first (a fixed window keeps its share per worker; the automatic one is bounded).
      consumerTimeoutMs: consumerTimeoutFor({
        workerTimeout: config.workerTimeout,
        killGrace: config.killGrace,
        perWorker: config.prefetchAuto ? MAX_PER_WORKER : Math.ceil(config.prefetch / config.workers),
      }),
      // What that channel delivered and has not started is the broker's again: drop it
      // here, or it would run now and again when redelivered.
      onChannelLost: () => this.pool.dropAbandoned(),
    });
    this.metrics = createMetrics(opts.registry ?? new Registry(), {
      sources: {
        workers: () => this.pool.stats(),
        inFlight: () => this.dispatcher.inFlight,
        connected: () => this.consumer.connected,
      },
    });
    this.dispatcher = new Dispatcher({
      pool: this.pool,
      consumer: this.consumer,
      publisher: this.publisher,
      metrics: this.metrics,
      logger,
      queue: config.queue,
      deadLetterQueue: deadLetterQueueName(config.queue),
      maxMessageBytes: config.maxMessageBytes,
      retryDelaysMs: topology.retryDelaysMs,
      crashJournal: new CrashJournal(opts.crashJournalPath ?? crashJournalPath(config.queue), CRASH_LIMIT),
    });
    this.#autoPrefetch = config.prefetchAuto
      ? new AutoPrefetch({
          logger,
          pool: this.pool,
          consumer: this.consumer,
          unsettled: () => this.dispatcher.inFlight,
        })
      : undefined;
    this.pool.on('restart', (reason) => this.metrics.workerRestarts.inc({ reason }));
    this.pool.on('fatal', (err) => this.#fail(err, 1));
    this.consumer.on('reconnected', () => this.metrics.amqpReconnects.inc());
    this.consumer.on('fatal', (err) => this.#fail(err, 2));
    this.consumer.on('state', (state) => this.#log.debug({ state }, 'consumer state'));
    this.http = buildServer({
      health: () => this.health(),
      status: () => this.status(),
      setWorkers: (count) => this.setWorkers(count),
      registry: this.metrics.registry,
      requestShutdown: (reason) => void this.drain(reason),
      shutdownToken: config.shutdownToken,
      logger,
    });
  }

  /**
   * Starts the workers (a task module that cannot load rejects with ERR_TASK_MODULE), then
   * the HTTP server, then consuming. Resolves once listening; the broker may still be on
   * its way, which /health tells.
   */
  async start(): Promise<void> {
    const { config } = this;
    this.#log.info(
      {
        workers: config.workers,
        amqp: redactUrl(config.amqpUrl),
        queue: config.queue,
        prefetch: config.prefetch,
        workerTimeout: config.workerTimeout,
      },
      'starting',
    );
    await this.pool.start();
    try {
      await this.http.listen({ host: config.httpHost, port: config.httpPort });
    } catch (err) {
      await this.pool.close(0);
      throw new ServiceError(
        'ERR_CONFIG',
        `--http-port: cannot listen on ${config.httpHost}:${config.httpPort}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    this.consumer.start();
    this.#autoPrefetch?.start();
  }

  /** The port the HTTP server listens on (useful with --http-port 0). */
  get httpPort(): number {
    const address = this.http.server.address();
    return typeof address === 'object' && address !== null ? address.port : this.config.httpPort;
  }

  /**
   * Readiness (SPEC §4): ok while connected, consuming and able to run work. A worker
   * being replaced (a timeout, a recycle, a reload) is normal operation, not a reason:
   * only no worker up at all, or replacements that keep failing to start.
   */
  health(): HealthReport {
    const stats = this.pool.stats();
    const up = stats.idle + stats.busy;
    const report: HealthReport = {
      status: 'ok',
      amqp: {
        connected: this.consumer.connected,
        blocked: this.consumer.blocked || this.publisher.blocked,
        ...(this.consumer.broker === undefined ? {} : { broker: this.consumer.broker }),
      },
      workers: { desired: stats.desired, up, busy: stats.busy },
      tasksInFlight: this.dispatcher.inFlight,
    };
    if (this.#draining !== undefined)
      return { ...report, status: 'draining', reason: 'the service is shutting down' };
    const state = this.consumer.state;
    if (state === 'connecting')
      return { ...report, status: 'connecting', reason: 'connecting to the broker' };
    if (state !== 'consuming')
      return { ...report, status: 'reconnecting', reason: 'the broker connection was lost' };
    if (stats.bootFailures > 0) {
      return {
        ...report,
        status: 'workers down',
        reason: `workers failing to start (${stats.bootFailures} in a row); ${up} of ${stats.desired} up`,
      };
    }
    // With one worker, its replacement (after a timeout or a recycle) leaves none up for a
    // moment: a replacement on its way is normal operation, not a reason; none at all is.
    if (up === 0 && stats.starting === 0)
      return { ...report, status: 'workers down', reason: `no worker up (0 of ${stats.desired})` };
    return report;
  }

  status(): StatusReport {
    return {
      health: this.health(),
      workers: this.pool.status(),
      queued: this.pool.stats().queued,
      prefetch: this.consumer.prefetch,
    };
  }

  /**
   * Resizes the pool (PUT /workers, SIGTTIN, SIGTTOU); the prefetch follows: by the task
   * duration when it is automatic, else keeping the deliveries per worker it started with.
   */
  setWorkers(count: number): void {
    this.pool.resize(count);
    if (this.#autoPrefetch !== undefined) {
      this.#autoPrefetch.retune();
      return;
    }
    const perWorker = this.config.prefetch / this.config.workers;
    void this.consumer.setPrefetch(Math.max(1, Math.min(MAX_PREFETCH, Math.round(perWorker * count))));
  }

  /** The last resort before the process dies of an uncaught error (see Dispatcher.recordCrash). */
  recordCrash(): void {
    this.dispatcher.recordCrash();
  }

  /** Rolls every worker onto the task module's current code (SIGHUP). */
  reload(): Promise<void> {
    return this.pool.reload();
  }

  /**
   * The graceful drain (SPEC §5), idempotent: stop consuming, give back what has not
   * started, let running tasks finish until the shutdown timeout (counted from now), settle
   * them, stop the workers, close the connections, and the HTTP server last.
   */
  drain(reason: string, code = 0, error?: ServiceError): Promise<Ending> {
    this.#draining ??= Promise.race([this.#drain(reason, code), this.#overdue()]).then((drained) => {
      const ending = error === undefined ? drained : { ...drained, error };
      this.#log.info(ending, 'stopped');
      this.#resolveEnded(ending);
      return ending;
    });
    return this.#draining;
  }

  /** A safety net past the shutdown timeout, for a broker that stops answering mid-drain. */
  #overdue(): Promise<Ending> {
    const ms = (this.config.shutdownTimeout + 15) * 1000;
    return new Promise((resolve) => {
      setTimeout(() => resolve({ code: 1, reason: 'the drain did not finish in time' }), ms).unref();
    });
  }

  async #drain(reason: string, code: number): Promise<Ending> {
    const graceMs = this.config.shutdownTimeout * 1000;
    const deadline = performance.now() + graceMs;
    this.#log.info({ reason, shutdownTimeout: this.config.shutdownTimeout }, 'draining');
    this.#autoPrefetch?.stop();
    await this.consumer.cancel();
    const settled = this.dispatcher.drain();
    await this.pool.close(Math.max(0, deadline - performance.now()));
    // The tasks are over; what may remain is publishing their dead letters and replies. A
    // publish that cannot finish by the deadline (publishing blocked by an alarm, a broker
    // that stopped answering) is failed by closing the publisher: its message goes back
    // to the queue, and the drain ends on time.
    if (!(await within(settled, deadline - performance.now()))) {
      this.#log.warn('publishes still waiting at the shutdown deadline: their messages go back to the queue');
      await this.publisher.close();
      await within(settled, 1_000);
    }
    await Promise.all([this.consumer.close(), this.publisher.close()]);
    await this.http.close();
    return { code, reason };
  }

  #fail(err: ServiceError, code: number): void {
    this.#log.fatal({ err }, 'cannot go on');
    void this.drain(err.message, code, err);
  }
}
