import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { Counter, Histogram, Registry } from 'prom-client';
import { OUTCOMES } from '../../../src/dispatch/outcome.ts';
import { DURATION_BUCKETS, TaskMetrics } from '../../../src/metrics/task-metrics.ts';

// The fast path must not change a byte of what Prometheus reads: the same observations
// through prom-client's own Counter and Histogram give the same exposition.
test('property: the exposition is the one prom-client Counter and Histogram give for the same tasks', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(
        fc.tuple(
          fc.constantFrom('add', 'echo', '<unknown>', 'a"b\\c'),
          fc.constantFrom(...OUTCOMES),
          fc.oneof(
            fc.constantFrom(0, ...DURATION_BUCKETS, 301),
            fc.double({ min: 0, max: 400, noNaN: true }),
          ),
        ),
        { maxLength: 60 },
      ),
      async (tasks) => {
        const ours = new Registry();
        const metrics = new TaskMetrics(ours, 'x_');
        const theirs = new Registry();
        const total = new Counter({
          name: 'x_tasks_total',
          help: 'Tasks that reached an outcome, by function and outcome.',
          labelNames: ['func', 'outcome'],
          registers: [theirs],
        });
        const duration = new Histogram({
          name: 'x_task_duration_seconds',
          help: 'Time from handing a task to a worker until its outcome, in seconds.',
          labelNames: ['func', 'outcome'],
          buckets: DURATION_BUCKETS,
          registers: [theirs],
        });
        for (const [func, outcome, seconds] of tasks) {
          metrics.record(func, outcome, seconds);
          total.inc({ func, outcome });
          duration.observe({ func, outcome }, seconds);
        }
        // prom-client lists label sets in the order first seen, as we do.
        assert.equal(await ours.metrics(), await theirs.metrics());
      },
    ),
  );
});

test('the OpenMetrics exposition works too, and a reset empties both', async () => {
  const registry = new Registry<typeof Registry.OPENMETRICS_CONTENT_TYPE>();
  registry.setContentType(Registry.OPENMETRICS_CONTENT_TYPE);
  const metrics = new TaskMetrics(registry, 'x_');
  metrics.record('add', 'succeeded', 0.002);
  const text = await registry.metrics();
  assert.match(text, /^x_tasks_total\{func="add",outcome="succeeded"\} 1$/m);
  assert.match(text, /^x_task_duration_seconds_bucket\{le="0.005",func="add",outcome="succeeded"\} 1$/m);
  registry.resetMetrics();
  assert.doesNotMatch(await registry.metrics(), /func="add"/);
});
