// Every metric lives in the master, in a registry that is passed in: the master sees
// every task begin and end, so no aggregation across child processes is needed (and
// prom-client's cluster aggregation works only with the `cluster` module anyway).
import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';
import { TaskMetrics } from './task-metrics.ts';

export const METRIC_PREFIX = 'amqp_concurrency_';

/** Label value for a func name that the task module does not export: keeps label sets bounded. */
export const UNKNOWN_FUNC = '<unknown>';

export type Metrics = ReturnType<typeof createMetrics>;

/** Live state that gauges read when scraped, so that no gauge can drift from the truth. */
export interface MetricSources {
  workers: () => { idle: number; busy: number };
  /** Messages received and not yet settled. */
  inFlight: () => number;
  /** The bytes of their bodies. */
  heldBytes: () => number;
  connected: () => boolean;
}

export function createMetrics(
  registry: Registry = new Registry(),
  opts: { defaultMetrics?: boolean; sources?: MetricSources } = {},
) {
  if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  const registers = [registry];
  const sources = opts.sources;
  return {
    registry,
    /** tasks_total and task_duration_seconds: recorded per task, read when scraped. */
    tasks: new TaskMetrics(registry, METRIC_PREFIX),
    tasksInFlight: new Gauge({
      name: `${METRIC_PREFIX}tasks_in_flight`,
      help: 'Messages received and not yet settled (waiting, running, or being dead-lettered).',
      registers,
      collect() {
        if (sources) this.set(sources.inFlight());
      },
    }),
    heldBytes: new Gauge({
      name: `${METRIC_PREFIX}held_bytes`,
      help: 'Bytes of the bodies of the messages in flight; past --max-held-bytes consuming pauses.',
      registers,
      collect() {
        if (sources) this.set(sources.heldBytes());
      },
    }),
    workers: new Gauge({
      name: `${METRIC_PREFIX}workers`,
      help: 'Worker processes by state.',
      labelNames: ['state'] as const,
      registers,
      collect() {
        if (!sources) return;
        const { idle, busy } = sources.workers();
        this.set({ state: 'idle' }, idle);
        this.set({ state: 'busy' }, busy);
      },
    }),
    workerRestarts: new Counter({
      name: `${METRIC_PREFIX}worker_restarts_total`,
      help: 'Workers replaced, by reason (timeout, crash, recycle, cancel).',
      labelNames: ['reason'] as const,
      registers,
    }),
    deadLettered: new Counter({
      name: `${METRIC_PREFIX}messages_dead_lettered_total`,
      help: 'Messages published to the dead-letter queue, by reason (the outcome).',
      labelNames: ['reason'] as const,
      registers,
    }),
    publishFailures: new Counter({
      name: `${METRIC_PREFIX}publish_failures_total`,
      help: 'Dead-letter, retry or reply copies the broker did not take, by reason (unroutable, unconfirmed); a dead-letter or retry copy that failed sends its original back to the queue.',
      labelNames: ['reason'] as const,
      registers,
    }),
    amqpConnected: new Gauge({
      name: `${METRIC_PREFIX}amqp_connected`,
      help: '1 while the consuming connection is open, else 0.',
      registers,
      collect() {
        if (sources) this.set(sources.connected() ? 1 : 0);
      },
    }),
    heldBack: new Counter({
      name: `${METRIC_PREFIX}tasks_held_back_total`,
      help: 'Tasks that waited in the master because their function was at its own limit, by func and limit (concurrency, rate); each task counted once per limit.',
      labelNames: ['func', 'limit'] as const,
      registers,
    }),
    delayed: new Counter({
      name: `${METRIC_PREFIX}messages_delayed_total`,
      help: 'Messages sent to wait in a delay queue (x-delay, or a retry of a function with its own retry delay), by func.',
      labelNames: ['func'] as const,
      registers,
    }),
    cancels: new Counter({
      name: `${METRIC_PREFIX}cancels_total`,
      help: 'Cancel requests, by what they found here (running, queued, remembered).',
      labelNames: ['result'] as const,
      registers,
    }),
    amqpReconnects: new Counter({
      name: `${METRIC_PREFIX}amqp_reconnects_total`,
      help: 'Connections to the broker re-established after a loss.',
      registers,
    }),
  };
}

/**
 * The names of the service's own metrics (without prom-client's process metrics), read
 * from a registry built as the service builds it: the list cannot drift from the metrics.
 */
export const SERVICE_METRIC_NAMES: readonly string[] = createMetrics(new Registry(), {
  defaultMetrics: false,
})
  .registry.getMetricsAsArray()
  .map((metric) => metric.name);
