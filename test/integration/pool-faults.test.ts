// The pool under interleavings nobody plans: random sequences of resize, reload, kill and
// timeouts against real children, and the quieter promises of issue 12: results written
// before a timeout kill count, a reload routes new functions to new code, a child running
// a backlog hears a cancel, readiness does not flap while one worker is replaced.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import fc from 'fast-check';
import pino from 'pino';
import { type JobResult, Pool } from '../../src/pool/pool.ts';
import {
  alive,
  broker,
  FIXTURE_TASKS,
  gate,
  taskRequest as request,
  startService,
  testConfig,
  waitFor,
} from '../support/helpers.ts';

const logger = pino({ level: 'silent' });

/** A pool of `size` on the fixture tasks (or `moduleUrl`), started; closed after the test. */
async function startedPool(
  t: TestContext,
  {
    size,
    taskTimeoutMs,
    moduleUrl = pathToFileURL(FIXTURE_TASKS).href,
  }: {
    size: number;
    taskTimeoutMs: number;
    moduleUrl?: string;
  },
): Promise<Pool> {
  const pool = new Pool({ size, moduleUrl, taskTimeoutMs, logger });
  t.after(() => pool.close(0));
  await pool.start();
  return pool;
}

type Op =
  | { op: 'resize'; n: number }
  | { op: 'reload' }
  | { op: 'kill' }
  | { op: 'tasks'; kind: 'add' | 'sleep' | 'spin' | 'crash'; n: number }
  | { op: 'pause' };

const ops: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ op: fc.constant('resize' as const), n: fc.integer({ min: 1, max: 4 }) }),
  fc.record({ op: fc.constant('reload' as const) }),
  fc.record({ op: fc.constant('kill' as const) }),
  fc.record({
    op: fc.constant('tasks' as const),
    kind: fc.constantFrom('add' as const, 'sleep' as const, 'spin' as const, 'crash' as const),
    n: fc.integer({ min: 1, max: 6 }),
  }),
  fc.record({ op: fc.constant('pause' as const) }),
);

test('property: any interleaving of resize, reload, kill and timeouts resolves every task once and converges', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(ops, { minLength: 1, maxLength: 10 }), async (sequence) => {
      const pool = new Pool({
        size: 2,
        moduleUrl: pathToFileURL(FIXTURE_TASKS).href,
        taskTimeoutMs: 300,
        logger,
        maxBootFailures: 1_000, // a kill during boot is a genuine boot failure; never give up here
      });
      let fatal: unknown;
      pool.on('fatal', (err) => {
        fatal = err;
      });
      await pool.start();
      const pids = new Set<number>();
      const results: Promise<JobResult>[] = [];
      let resolved = 0;
      const reloads: Promise<void>[] = [];
      try {
        for (const step of sequence) {
          for (const w of pool.status()) if (w.pid !== undefined) pids.add(w.pid);
          if (step.op === 'resize') pool.resize(step.n);
          else if (step.op === 'reload') reloads.push(pool.reload());
          else if (step.op === 'kill') {
            const victim = pool.status().find((w) => w.pid !== undefined && w.state !== 'stopping');
            if (victim?.pid !== undefined) process.kill(victim.pid, 'SIGKILL');
          } else if (step.op === 'pause') await new Promise((r) => setTimeout(r, 20));
          else {
            const args = { add: [1, 2], sleep: [0.02], spin: [], crash: [3] }[step.kind];
            for (let i = 0; i < step.n; i++) {
              const result = pool.run(request(step.kind, args));
              result.then(() => {
                resolved++;
              });
              results.push(result);
            }
          }
        }
        // Every task ends (a promise resolves at most once; none may hang).
        const endings = await Promise.race([
          Promise.all(results),
          new Promise<never>((_, reject) =>
            setTimeout(() => reject(new Error(`${results.length - resolved} tasks never ended`)), 20_000),
          ),
        ]);
        for (const e of endings)
          assert.ok(['succeeded', 'timeout', 'crashed'].includes(e.outcome), e.outcome);
        await Promise.all(reloads);
        // It converges on the size last asked for, all of it up, nothing starting.
        await waitFor(
          'the pool to converge',
          () => {
            const s = pool.stats();
            return s.idle + s.busy === s.desired && s.starting === 0 && pool.status().length === s.desired;
          },
          20_000,
        );
        assert.equal(fatal, undefined);
      } finally {
        for (const w of pool.status()) if (w.pid !== undefined) pids.add(w.pid);
        await pool.close(0);
      }
      // And leaves no process behind.
      await waitFor('every worker process gone', () => ![...pids].some(alive), 10_000);
    }),
    { numRuns: 12 },
  );
});

test('a timeout kill keeps the results the child wrote before it: only the task that ran long is a timeout', async (t) => {
  const pool = await startedPool(t, { size: 1, taskTimeoutMs: 400 });
  // Teach the pool that tasks are tiny, so that it pipelines several to the one child.
  for (let i = 0; i < 50; i++) await pool.run(request('add', [i, 1]));
  // Quick ones, then one that spins past the limit: handed over together.
  const quick = Array.from({ length: 5 }, (_, i) => pool.run(request('add', [i, 0])));
  const spin = pool.run(request('spin'));
  await new Promise((r) => setImmediate(r));
  // The master freezes past the limit (a long GC, a busy loop of its own): the quick
  // results wait in the pipe, unread, when the first one's timer fires.
  const frozenUntil = performance.now() + 700;
  while (performance.now() < frozenUntil) {
    // frozen
  }
  const endings = await Promise.all([...quick, spin]);
  assert.deepEqual(
    endings.map((e) => e.outcome),
    ['succeeded', 'succeeded', 'succeeded', 'succeeded', 'succeeded', 'timeout'],
  );
});

test('during a reload, a function only the new code exports goes only to new workers, never failing as unknown', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'reload-funcs-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const module = join(dir, 'tasks.mjs');
  // `old` waits until the file it is given exists: the test says when the busy old worker
  // may finish, not the machine's speed.
  const oldCode = [
    "import { existsSync } from 'node:fs';",
    'export async function old(gate) {',
    '  while (!existsSync(gate)) await new Promise((r) => setTimeout(r, 20));',
    '  return "old";',
    '}',
  ].join('\n');
  writeFileSync(module, oldCode);
  const busyGate = join(dir, 'gate');
  // The busy task waits at its gate while the new workers boot.
  const pool = await startedPool(t, {
    size: 3,
    taskTimeoutMs: 60_000,
    moduleUrl: pathToFileURL(module).href,
  });
  // One old worker busy until the gate opens; the other two idle, and still there when
  // the first new worker says ready.
  const busy = pool.run(request('old', [busyGate]));
  writeFileSync(module, `${oldCode}\nexport function fresh() { return "new"; }`);
  const fresh: Promise<JobResult>[] = [];
  const onChange = () => {
    if (fresh.length > 0 || !pool.funcs.has('fresh')) return;
    // In the same turn as the new worker's ready: old idle workers are still live.
    for (let i = 0; i < 12; i++) fresh.push(pool.run(request('fresh')));
  };
  pool.on('change', onChange);
  const reloading = pool.reload();
  await waitFor('the new function known', () => fresh.length > 0);
  pool.off('change', onChange);
  for (const ending of await Promise.all(fresh))
    assert.equal(ending.outcome, 'succeeded', JSON.stringify(ending));
  writeFileSync(busyGate, '');
  assert.equal((await busy).outcome, 'succeeded');
  await reloading;
});

test('a child running a backlog of synchronous tasks hears a cancel: the drain takes the rest back', async (t) => {
  const pool = await startedPool(t, { size: 1, taskTimeoutMs: 5_000 });
  // The average says tiny, so a burst of 20 ms synchronous tasks is pipelined deep.
  for (let i = 0; i < 50; i++) await pool.run(request('add', [i, 1]));
  const tasks = Array.from({ length: 64 }, () => pool.run(request('busy', [20])));
  await new Promise((r) => setTimeout(r, 50));
  const started = performance.now();
  const closing = pool.close(5_000);
  const endings = await Promise.all(tasks);
  await closing;
  const returned = endings.filter((e) => e.outcome === 'returned').length;
  const succeeded = endings.filter((e) => e.outcome === 'succeeded').length;
  t.diagnostic(
    `${succeeded} ran, ${returned} taken back by the drain in ${Math.round(performance.now() - started)} ms`,
  );
  assert.equal(returned + succeeded, 64);
  // Without a turn of its event loop between tasks, the child would run all 64 (1.3 s)
  // before it read the cancel, and none would be taken back. With it, some 60 are; 16
  // leaves room for a busy machine to stall this process up to a second before the cancel.
  assert.ok(returned >= 16, `${returned} taken back`);
});

test('once a drain begins nothing starts, and a task cancelled meanwhile ends cancelled, not given back', async (t) => {
  const running = gate(t);
  const pool = await startedPool(t, { size: 1, taskTimeoutMs: 60_000 });
  const cancelledRequest = request('add', [1, 2]);
  // Asked for in one turn: handed over together, the worker holds the second behind the
  // first (the third in the worker too, or in the master's queue).
  const first = pool.run(request('waitAtGate', [running.path]));
  const second = pool.run(cancelledRequest);
  const third = pool.run(request('add', [3, 4]));
  await waitFor('the second handed over', () => (pool.status()[0]?.held ?? 0) >= 2);
  pool.stopStarting();
  // Still held by the worker (the ask crosses the IPC channel): cancelled there.
  assert.equal(
    pool.cancel((r) => r === cancelledRequest),
    'queued',
  );
  await waitFor('the worker to hold only its running task', () => pool.status()[0]?.held === 1);
  running.open();
  assert.equal((await first).outcome, 'succeeded');
  assert.equal(pool.stats().queued, 2, 'the other two wait in the master, unstarted');
  await pool.close(5_000);
  assert.equal((await second).outcome, 'cancelled');
  assert.equal((await third).outcome, 'returned');
});

test('readiness does not flap while the only worker is replaced after each task', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 1, maxTasksPerWorker: 1 }));
  const q = service.config.queue;
  let notReady = 0;
  let polls = 0;
  const poller = setInterval(() => {
    polls++;
    if (service.health().status !== 'ok') notReady++;
  }, 2);
  t.after(() => clearInterval(poller));
  for (let i = 0; i < 10; i++) await b.send(q, { func: 'add', args: [i, 1] });
  await waitFor(
    'ten recycles',
    () => service.pool.status().length === 1 && service.dispatcher.inFlight === 0 && polls > 0,
  );
  await waitFor('the queue empty', async () => (await b.count(q)) === 0 && service.dispatcher.inFlight === 0);
  clearInterval(poller);
  t.diagnostic(`${polls} polls of /health during ten replacements, ${notReady} not ok`);
  assert.equal(notReady, 0);
});
