// The per-task metrics, tasks_total and task_duration_seconds, kept where they are cheap
// to update: recording an outcome is a map lookup and a few additions, because it happens
// for every task in the master's hot path. prom-client's own Counter and Histogram check
// and hash their label set on every call, which at tens of thousands of tasks a second
// cost the master more than any other step of a task. The figures are read out only when
// /metrics is scraped, through two objects with the shape prom-client's Registry reads
// (name, help, type, get()), so the exposition stays prom-client's.
import type { Metric, Registry } from 'prom-client';

/** Upper bounds of the duration buckets, in seconds: from 1 ms tasks to 5 min ones. */
export const DURATION_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

interface Tally {
  labels: { func: string; outcome: string };
  count: number;
  sum: number;
  /** Per bucket, not cumulative; the last slot counts values above every bound. */
  buckets: number[];
}

/** One sample as the Registry prints it: `metricName` (if not the metric's) `{labels} value`. */
interface Sample {
  metricName?: string;
  labels: Record<string, string | number>;
  value: number;
}

/** What the Registry reads of a metric (prom-client's types name only its own classes). */
interface Exposed {
  name: string;
  help: string;
  type: 'counter' | 'histogram';
  aggregator: 'sum';
  get(): Promise<{ name: string; help: string; type: string; aggregator: 'sum'; values: Sample[] }>;
  reset(): void;
}

export class TaskMetrics {
  /** func → outcome → tally: no string is built to find one. */
  readonly #tallies = new Map<string, Map<string, Tally>>();
  /** The same tallies in the order first seen, the order prom-client lists label sets in. */
  #ordered: Tally[] = [];

  constructor(registry: Pick<Registry, 'registerMetric'>, prefix: string) {
    const totals = this.#exposed(
      `${prefix}tasks_total`,
      'counter',
      'Tasks that reached an outcome, by function and outcome.',
      () => this.#all().map((t) => ({ labels: t.labels, value: t.count })),
    );
    const durations = this.#exposed(
      `${prefix}task_duration_seconds`,
      'histogram',
      'Time from handing a task to a worker until its outcome, in seconds.',
      () => this.#all().flatMap((t) => this.#histogramValues(durations.name, t)),
    );
    registry.registerMetric(totals as unknown as Metric);
    registry.registerMetric(durations as unknown as Metric);
  }

  /** One task's outcome (dispatch/outcome.ts names them) and its duration. */
  record(func: string, outcome: string, seconds: number): void {
    let byOutcome = this.#tallies.get(func);
    if (byOutcome === undefined) {
      byOutcome = new Map();
      this.#tallies.set(func, byOutcome);
    }
    let tally = byOutcome.get(outcome);
    if (tally === undefined) {
      tally = {
        labels: { func, outcome },
        count: 0,
        sum: 0,
        buckets: new Array(DURATION_BUCKETS.length + 1).fill(0),
      };
      byOutcome.set(outcome, tally);
      this.#ordered.push(tally);
    }
    tally.count++;
    tally.sum += seconds;
    let i = 0;
    while (i < DURATION_BUCKETS.length && seconds > (DURATION_BUCKETS[i] as number)) i++;
    (tally.buckets[i] as number)++;
  }

  #all(): Tally[] {
    return this.#ordered;
  }

  #histogramValues(name: string, t: Tally): Sample[] {
    const values: Sample[] = [];
    let cumulative = 0;
    DURATION_BUCKETS.forEach((le, i) => {
      cumulative += t.buckets[i] as number;
      values.push({ metricName: `${name}_bucket`, labels: { le, ...t.labels }, value: cumulative });
    });
    values.push(
      { metricName: `${name}_bucket`, labels: { le: '+Inf', ...t.labels }, value: t.count },
      { metricName: `${name}_sum`, labels: t.labels, value: t.sum },
      { metricName: `${name}_count`, labels: t.labels, value: t.count },
    );
    return values;
  }

  #exposed(name: string, type: 'counter' | 'histogram', help: string, values: () => Sample[]): Exposed {
    return {
      name,
      help,
      type,
      aggregator: 'sum',
      get: async function (this: Exposed) {
        return { name: this.name, help, type: this.type, aggregator: 'sum', values: values() };
      },
      reset: () => {
        this.#tallies.clear();
        this.#ordered = [];
      },
    };
  }
}
