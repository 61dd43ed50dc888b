// The service whole: pool, consuming and publishing connections, dispatcher, metrics and
// HTTP, built from a Config. It never touches `process`: the CLI owns signals and exit
// codes, so tests can build and stop a service in-process.
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import { Registry } from 'prom-client';
import { AddressList } from '../amqp/connection.ts';
import { AmqpConsumer } from '../amqp/consumer.ts';
import { listenForOrders } from '../amqp/control.ts';
import { DEFAULT_URLS } from '../amqp/defaults.ts';
import { AutoPrefetch, resizedPrefetch } from '../amqp/prefetch.ts';
import { AmqpPublisher } from '../amqp/publisher.ts';
import { deadLetterQueueName } from '../amqp/topology.ts';
import { redactUrl, splitUrls } from '../amqp/url.ts';
import { type Config, WORKER_RSS_MB } from '../config/option-table.ts';
import { CRASH_LIMIT, CrashJournal, crashJournalPath } from '../dispatch/crash-journal.ts';
import { Dispatcher } from '../dispatch/dispatcher.ts';
import { finishedMemo } from '../dispatch/work.ts';
import { ServiceError } from '../errors.ts';
import {
  buildServer,
  type CancelAnswer,
  type DeadAnswer,
  type HealthReport,
  type StatusReport,
} from '../http/server.ts';
import { createMetrics, type Metrics } from '../metrics/metrics.ts';
import { Pool } from '../pool/pool.ts';
import type { TracingConfig } from '../telemetry/config.ts';
import type { TaskTracer } from '../telemetry/task-tracer.ts';
import { deadOverHttp } from './dead-over-http.ts';
import { drainInOrder, type ServiceExit } from './drain.ts';
import { healthReport } from './health.ts';
import { LiveTopology } from './live-topology.ts';
import { Replicas } from './replicas.ts';
import { startNotices } from './start-notices.ts';

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
  /** Tracing settings (from OTEL_*: telemetry/config.ts); absent, tracing is off and its SDK never loaded. */
  tracing?: TracingConfig;
}

/** The longest a task waits for its function's concurrency or rate before it goes back through a delay queue. */
const MAX_HELD_BACK_MS = 2 * 60_000;

export class Service {
  readonly config: Config;
  readonly metrics: Metrics;
  readonly pool: Pool;
  readonly consumer: AmqpConsumer;
  readonly publisher: AmqpPublisher;
  readonly dispatcher: Dispatcher;
  readonly http: FastifyInstance;
  /** Present when no prefetch was given: the window follows the task duration. */
  readonly #autoPrefetch: AutoPrefetch | undefined;
  readonly #log: Logger;
  readonly #crashJournal: CrashJournal;
  #draining: Promise<ServiceExit> | undefined;
  /** The topology every connect declares, kept up to date (live-topology.ts). */
  readonly #topology: LiveTopology;
  readonly #tracing: TracingConfig | undefined;
  #tracer: TaskTracer | undefined;
  /** Where a dead-letter pass over HTTP connects: the service's own addresses. */
  readonly #deadAddresses: AddressList;
  readonly #replicas: Replicas;
  #resolveEnded: (ending: ServiceExit) => void = () => {};
  /** Resolves when the service has stopped, by a drain or a fatal error. */
  readonly ended: Promise<ServiceExit>;

  constructor(opts: ServiceOptions) {
    const { config, logger } = opts;
    this.config = config;
    this.#log = logger;
    this.#tracing = opts.tracing;
    this.ended = new Promise((resolve) => {
      this.#resolveEnded = resolve;
    });
    this.pool = new Pool({
      size: config.workers,
      moduleUrl: opts.moduleUrl,
      taskTimeoutMs: config.workerTimeout * 1000,
      killGraceMs: config.killGrace * 1000,
      maxTasksPerWorker: config.maxTasksPerWorker,
      maxWorkerMemoryBytes: config.maxWorkerMemory * 1024 * 1024,
      maxResultBytes: config.maxResultBytes,
      // Within the consumer timeout's slack (consumer-timeout.ts): waiting for a function's
      // limit comes on top of the longest hold.
      maxHeldBackMs: MAX_HELD_BACK_MS,
      logger,
    });
    const urls = config.amqpUrlGiven ? splitUrls(config.amqpUrl) : [...DEFAULT_URLS];
    // No URL given: the default accounts, tried in order, the one that works kept; one
    // list for both connections, so the publisher logs in as the consumer did.
    const addresses = config.amqpUrlGiven ? undefined : AddressList.accounts(urls);
    const connectTimeoutMs = config.connectTimeout * 1000;
    this.#deadAddresses = addresses ?? new AddressList(urls);
    // The publisher is built below: the declare is called only once deliveries flow.
    const live = new LiveTopology(config, logger, () => this.publisher.declare());
    this.#topology = live;
    const topology = live.topology;
    this.publisher = new AmqpPublisher({
      urls,
      ...(addresses === undefined ? {} : { addresses }),
      connectTimeoutMs,
      topology,
      logger,
      ...(opts.publishTimeoutMs === undefined ? {} : { publishTimeoutMs: opts.publishTimeoutMs }),
    });
    this.consumer = new AmqpConsumer({
      urls,
      ...(addresses === undefined ? {} : { addresses }),
      connectTimeoutMs,
      topology,
      prefetch: config.prefetch,
      logger,
      onDelivery: (delivery) => this.dispatcher.handle(delivery),
      ackMemo: finishedMemo,
      // Enough work waits here for a free worker: the broker's next delivery would only join it.
      acksMayWait: (workMs) => this.pool.backlogCovers(workMs),
      // What that channel delivered and has not started is the broker's again: drop it
      // here, or it would run now and again when redelivered.
      onChannelLost: (lost) => {
        this.pool.dropAbandoned();
        this.dispatcher.sessionLost(lost);
      },
      onConsuming: (connection) => {
        listenForOrders(
          connection,
          config.queue,
          (order, channel) => this.#replicas.onOrder(order, channel),
          logger,
        ).catch((err: unknown) =>
          this.#log.warn(
            { err },
            'cannot listen on the control exchange: cancels sent to other replicas do not reach this one',
          ),
        );
      },
    });
    this.metrics = createMetrics(opts.registry ?? new Registry(), {
      sources: {
        workers: () => this.pool.stats(),
        inFlight: () => this.dispatcher.inFlight,
        heldBytes: () => this.dispatcher.heldBytes,
        connected: () => this.consumer.connected,
      },
    });
    this.#crashJournal = new CrashJournal(
      opts.crashJournalPath ?? crashJournalPath(config.stateDir, config.queue),
      CRASH_LIMIT,
    );
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
      declareDelayQueue: (stepMs) => live.declareDelayQueue(stepMs),
      retryBaseMs: config.retryDelay * 1000,
      retryMaxMs: config.retryDelayMax * 1000,
      crashJournal: this.#crashJournal,
      heldBytesBudget: config.maxHeldBytes,
      onPressure: (over) => (over ? this.consumer.pause() : this.consumer.resume()),
      renewAdopted: config.queueType === 'quorum' && config.deliveryLimit > 0,
    });
    this.#replicas = new Replicas({
      queue: config.queue,
      publisher: this.publisher,
      cancelHere: (messageId) => this.dispatcher.cancel(messageId),
      logger,
    });
    this.#autoPrefetch = config.prefetchAuto
      ? new AutoPrefetch({
          logger,
          pool: this.pool,
          consumer: this.consumer,
          unsettled: () => this.dispatcher.inFlight,
          memory: {
            budgetBytes: config.maxHeldBytes,
            largestBodyBytes: config.maxMessageBytes,
            averageBodyBytes: () => this.dispatcher.averageBodyBytes,
          },
        })
      : undefined;
    this.pool.on('restart', (reason) => this.metrics.workerRestarts.inc({ reason }));
    this.pool.on('heldBack', (func, limit) => this.metrics.heldBack.inc({ func, limit }));
    this.pool.on('limits', () => {
      if (this.consumer.state !== 'connecting') this.#topology.fitConsumerTimeout(this.pool.limits, true);
    });
    this.pool.on('fatal', (err) => this.#fail(err, 1));
    this.consumer.on('reconnected', () => this.metrics.amqpReconnects.inc());
    this.consumer.on('fatal', (err) => this.#fail(err, 2));
    this.consumer.on('state', (state) => this.#log.debug({ state }, 'consumer state'));
    this.http = buildServer({
      health: () => this.health(),
      status: () => this.status(),
      setWorkers: (count) => this.setWorkers(count),
      cancel: (messageId) => this.cancel(messageId),
      dead: (action, raw) => this.dead(action, raw),
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
        amqp: config.amqpUrlGiven ? redactUrl(config.amqpUrl) : DEFAULT_URLS.map(redactUrl).join(' or '),
        queue: config.queue,
        prefetch: config.prefetch,
        workerTimeout: config.workerTimeout,
      },
      'starting',
    );
    startNotices(config, this.#crashJournal.problem, this.#log);
    if (this.#tracing !== undefined) {
      const { startTracing } = await import('../telemetry/tracing.ts');
      this.#tracer = await startTracing(this.#tracing);
      this.dispatcher.setTracer(this.#tracer);
      this.#log.info(
        {
          endpoint: this.#tracing.tracesUrl,
          protocol: this.#tracing.protocol,
          service: this.#tracing.serviceName,
        },
        'tracing: one span per task',
      );
    }
    await this.pool.start();
    this.#topology.fitConsumerTimeout(this.pool.limits);
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

  /** Readiness (README "HTTP"; the rules in health.ts). */
  health(): HealthReport {
    const consumer = this.consumer;
    return healthReport({
      pool: this.pool.stats(),
      consumer: {
        state: consumer.state,
        connected: consumer.connected,
        blocked: consumer.blocked,
        paused: consumer.paused,
        ...(consumer.broker === undefined ? {} : { broker: consumer.broker }),
      },
      publisherBlocked: this.publisher.blocked,
      tasksInFlight: this.dispatcher.inFlight,
      draining: this.#draining !== undefined,
    });
  }

  status(): StatusReport {
    return {
      health: this.health(),
      workers: this.pool.status(),
      queued: this.pool.stats().queued,
      prefetch: this.consumer.prefetch,
      funcs: this.pool.funcStatus(),
    };
  }

  /** Cancels a task by message id (DELETE /tasks/{id}): here and on every other replica. */
  cancel(messageId: string): CancelAnswer {
    return this.#replicas.cancel(messageId);
  }

  /** One pass over the dead-letter queue for GET /dead and POST /dead/replay|purge. */
  dead(action: 'list' | 'replay' | 'purge', raw: Record<string, unknown>): Promise<DeadAnswer> {
    return deadOverHttp(action, raw, {
      addresses: this.#deadAddresses,
      connectTimeoutMs: this.config.connectTimeout * 1000,
      queue: this.config.queue,
      exchange: this.config.exchange,
      stateDir: this.config.stateDir,
      logger: this.#log,
    });
  }

  /**
   * Resizes the pool (PUT /workers, SIGTTIN, SIGTTOU); the prefetch follows: by the task
   * duration when it is automatic, else keeping the deliveries per worker it started with.
   */
  setWorkers(count: number): void {
    const max = this.config.maxWorkers;
    if (count > max)
      throw new RangeError(
        `${count} workers is over --max-workers (${max}): each takes about ${WORKER_RSS_MB} MB; raise --max-workers if the machine has the memory`,
      );
    this.pool.resize(count);
    if (this.#autoPrefetch !== undefined) {
      this.#autoPrefetch.retune();
      return;
    }
    void this.consumer.setPrefetch(resizedPrefetch(this.config.prefetch, this.config.workers, count));
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
   * The graceful drain (README "Stopping"; its order in drain.ts), idempotent; the
   * shutdown timeout counts from the first call.
   */
  drain(reason: string, code = 0, error?: ServiceError): Promise<ServiceExit> {
    this.#draining ??= drainInOrder(
      {
        shutdownTimeout: this.config.shutdownTimeout,
        log: this.#log,
        autoPrefetch: this.#autoPrefetch,
        pool: this.pool,
        consumer: this.consumer,
        dispatcher: this.dispatcher,
        publisher: this.publisher,
        tracer: () => this.#tracer,
        http: this.http,
      },
      reason,
      code,
    ).then((drained) => {
      const ending = error === undefined ? drained : { ...drained, error };
      this.#log.info(ending, 'stopped');
      this.#resolveEnded(ending);
      return ending;
    });
    return this.#draining;
  }

  #fail(err: ServiceError, code: number): void {
    this.#log.fatal({ err }, 'cannot go on');
    void this.drain(err.message, code, err);
  }
}
