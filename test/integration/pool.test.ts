// The worker pool with real forked children, no broker.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import pino from 'pino';
import type { ServiceError } from '../../src/errors.ts';
import { Pool } from '../../src/pool/pool.ts';
import { FIXTURE_TASKS, gate, taskRequest as request, waitFor } from '../support/helpers.ts';

const logger = pino({ level: 'silent' });

function pool(
  t: { after: (fn: () => unknown) => void },
  opts: Partial<ConstructorParameters<typeof Pool>[0]> = {},
) {
  const p = new Pool({
    size: 2,
    moduleUrl: pathToFileURL(FIXTURE_TASKS).href,
    taskTimeoutMs: 5_000,
    logger,
    ...opts,
  });
  t.after(() => p.close(0));
  return p;
}

test('children say ready with the names they can run; tasks run and return', async (t) => {
  const p = pool(t);
  await p.start();
  assert.deepEqual(p.stats(), { desired: 2, starting: 0, idle: 2, busy: 0, queued: 0, bootFailures: 0 });
  assert.ok(p.funcs.has('add') && p.funcs.has('sleep'));
  assert.ok(!p.funcs.has('default'));
  const results = await Promise.all([p.run(request('add', [1, 2])), p.run(request('echo', ['x']))]);
  assert.deepEqual(
    results.map((r) => (r.outcome === 'succeeded' ? r.resultJson : r.outcome)),
    ['3', '["x"]'],
  );
});

test('results come back on a pipe, not a socket pair (pool/results-fifo.ts)', {
  skip: process.platform !== 'linux',
}, async (t) => {
  const p = pool(t, { size: 1 });
  await p.start();
  const result = await p.run(request('pid'));
  assert.equal(result.outcome, 'succeeded');
  const pid = Number(result.outcome === 'succeeded' ? result.resultJson : 0);
  // RESULTS_FD in the child, seen through /proc: a pipe, not a socket.
  const fd = statSync(`/proc/${pid}/fd/4`);
  assert.ok(fd.isFIFO() && !fd.isSocket());
});

/** The FIFOs this process holds open, by direction (from /proc/self/fdinfo's flags). */
function fifoEnds(): { read: number; write: number } {
  const ends = { read: 0, write: 0 };
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (!statSync(`/proc/self/fd/${fd}`).isFIFO()) continue;
      const flags = /^flags:\s*(\d+)/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1];
      if (flags === undefined) continue;
      // O_ACCMODE: 0 read, 1 write.
      if ((Number.parseInt(flags, 8) & 3) === 1) ends.write++;
      else ends.read++;
    } catch {
      // Closed while we looked (readdir's own descriptor among them).
    }
  }
  return ends;
}

test('the master holds only the read end of each results pipe, and lets it go with the pool', {
  skip: process.platform !== 'linux',
}, async (t) => {
  const before = fifoEnds();
  const p = pool(t);
  await p.start();
  assert.equal((await p.run(request('add', [1, 2]))).outcome, 'succeeded');
  // A write end kept here would keep the pipe from its end of file when the child dies.
  assert.deepEqual(fifoEnds(), { read: before.read + 2, write: before.write });
  await p.close(0);
  await waitFor('the read ends closed', () => fifoEnds().read === before.read);
  assert.deepEqual(fifoEnds(), before);
});

test('each worker runs one task at a time: the third waits, counted as queued', async (t) => {
  const p = pool(t);
  await p.start();
  const runs = [p.run(request('sleep', [0.3])), p.run(request('sleep', [0.3])), p.run(request('pid'))];
  await waitFor('both workers busy', () => p.stats().busy === 2);
  assert.deepEqual(p.stats(), { desired: 2, starting: 0, idle: 0, busy: 2, queued: 1, bootFailures: 0 });
  const results = await Promise.all(runs);
  assert.deepEqual(
    results.map((r) => r.outcome),
    ['succeeded', 'succeeded', 'succeeded'],
  );
  assert.deepEqual(p.stats(), { desired: 2, starting: 0, idle: 2, busy: 0, queued: 0, bootFailures: 0 });
});

test('backlogCovers: the tasks queued for a free worker, times the average run, against the work asked for each worker', async (t) => {
  const p = pool(t, { size: 1 });
  await p.start();
  assert.equal(p.backlogCovers(1), false, 'no task timed yet');
  assert.equal((await p.run(request('sleep', [0.05]))).outcome, 'succeeded'); // the average: about 50 ms
  const runs = [1, 0.05, 0.05].map((s) => p.run(request('sleep', [s])));
  // One runs, the next is held behind it, the third waits here (queued counts both).
  await waitFor('the running one and two queued', () => p.stats().busy === 1 && p.stats().queued === 2);
  assert.equal(p.backlogCovers(40), true, 'one task of about 50 ms covers 40 ms for the one worker');
  assert.equal(p.backlogCovers(1_000), false, 'but not a second');
  await Promise.all(runs);
  assert.equal(p.backlogCovers(1), false, 'nothing queued');
});

test('a task held behind one that turns out long is run by the other worker, while newer tasks keep both busy', async (t) => {
  const p = pool(t);
  await p.start();
  const ended: string[] = [];
  const track = (name: string, run: ReturnType<Pool['run']>) =>
    run.then((r) => {
      ended.push(name);
      return r;
    });
  // The first worker takes the long task, the second a short one, and the first the
  // next task (held behind the long one): both hold one task each.
  // The long one runs until the gate opens: the held task ends first whatever the machine.
  const longGate = gate(t);
  const long = track('long', p.run(request('waitAtGate', [longGate.path])));
  const first = track('short', p.run(request('sleep', [0.05])));
  const held = track('held', p.run(request('pid')));
  // Newer tasks keep the queue full, so no worker ever idles.
  const newer = Array.from({ length: 30 }, (_, i) => track(`newer${i}`, p.run(request('sleep', [0.05]))));
  const heldResult = await held;
  assert.equal(heldResult.outcome, 'succeeded');
  assert.ok(!ended.includes('long'), `the held task ended before the long one (ended: ${ended.join(', ')})`);
  longGate.open();
  const longResult = await long;
  assert.equal(longResult.outcome, 'succeeded');
  await Promise.all([first, ...newer]);
  // Taken back to the front once the long one had run three times the average (50 ms):
  // ahead of most of the newer tasks, which would all have passed it in its old place.
  assert.ok(ended.indexOf('held') < ended.indexOf('newer15'), `ended in this order: ${ended.join(', ')}`);
});

test('a module that fails to load rejects start with ERR_TASK_MODULE and leaves no child behind', async (t) => {
  const p = pool(t, { moduleUrl: new URL('../fixtures/broken-tasks.ts', import.meta.url).href });
  await assert.rejects(p.start(), (err: ServiceError) => {
    assert.equal(err.code, 'ERR_TASK_MODULE');
    assert.match(err.message, /broken on purpose/);
    return true;
  });
  assert.deepEqual(p.stats(), { desired: 2, starting: 0, idle: 0, busy: 0, queued: 0, bootFailures: 0 });
});

test('the master kills a task past its deadline, waits for the exit, then refills the slot', async (t) => {
  const p = pool(t, { size: 1, taskTimeoutMs: 300 });
  await p.start();
  const before = await p.run(request('pid'));
  const restarts: string[] = [];
  p.on('restart', (reason) => restarts.push(reason));
  const spun = await p.run(request('spin'));
  assert.equal(spun.outcome, 'timeout');
  assert.ok(spun.outcome === 'timeout' && spun.durationMs >= 290);
  const after = await p.run(request('pid'));
  assert.equal(after.outcome, 'succeeded');
  assert.notEqual(
    before.outcome === 'succeeded' && before.resultJson,
    after.outcome === 'succeeded' && after.resultJson,
    'a new process',
  );
  assert.deepEqual(restarts, ['timeout']);
});

test('a death while busy is crashed; an idle death is a crash restart too', async (t) => {
  const p = pool(t, { size: 1 });
  await p.start();
  const restarts: string[] = [];
  p.on('restart', (reason) => restarts.push(reason));
  const crashed = await p.run(request('crash', [9]));
  assert.equal(crashed.outcome, 'crashed');
  assert.match(crashed.outcome === 'crashed' ? crashed.error.message : '', /exit code 9/);
  await waitFor('the pool to refill', () => p.stats().idle === 1);
  const pidResult = await p.run(request('pid'));
  const pid = Number(pidResult.outcome === 'succeeded' ? pidResult.resultJson : 0);
  process.kill(pid, 'SIGKILL');
  await waitFor('the second restart', () => restarts.length === 2);
  await waitFor('the pool to refill again', () => p.stats().idle === 1);
  assert.deepEqual(restarts, ['crash', 'crash']);
});

test('handed over in one batch: what finished before a crash keeps its result, what had not started runs on', async (t) => {
  const p = pool(t, { size: 1 });
  await p.start();
  // Short tasks make the pool hand several to the child at once (pipelining).
  for (let i = 0; i < 5; i++) await p.run(request('add', [i, 1]));
  const before = Array.from({ length: 20 }, (_, i) => p.run(request('add', [i, 0])));
  const crash = p.run(request('crash', [4]));
  const after = Array.from({ length: 5 }, (_, i) => p.run(request('add', [i, 100])));
  const results = await Promise.all([...before, crash, ...after]);
  assert.deepEqual(
    results.map((r) => (r.outcome === 'succeeded' ? Number(r.resultJson) : r.outcome)),
    [...Array.from({ length: 20 }, (_, i) => i), 'crashed', 100, 101, 102, 103, 104],
  );
});

test('short tasks ahead of one that hangs succeed; the hung one alone times out, on its own clock', async (t) => {
  const p = pool(t, { size: 1, taskTimeoutMs: 300 });
  await p.start();
  for (let i = 0; i < 5; i++) await p.run(request('add', [i, 1]));
  const quick = Array.from({ length: 10 }, (_, i) => p.run(request('add', [i, 0])));
  const spun = p.run(request('spin'));
  const results = await Promise.all([...quick, spun]);
  assert.deepEqual(
    results.map((r) => r.outcome),
    [...Array(10).fill('succeeded'), 'timeout'],
  );
  const last = results.at(-1);
  assert.ok(last?.outcome === 'timeout' && last.durationMs >= 290, 'timed from its own start');
});

test('close gives back queued tasks at once and lets running ones finish', async (t) => {
  const p = pool(t, { size: 1 });
  await p.start();
  const running = p.run(request('sleep', [0.3]));
  const queued = p.run(request('add', [1, 1]));
  await waitFor('the first task to start', () => p.stats().busy === 1);
  const closing = p.close(5_000);
  assert.deepEqual(await queued, { outcome: 'returned', reason: 'not started before shutdown' });
  assert.equal((await running).outcome, 'succeeded');
  await closing;
  assert.deepEqual(await p.run(request('add', [1, 1])), {
    outcome: 'returned',
    reason: 'the pool is closing',
  });
});

test('close kills what still runs at the deadline and gives it back', async (t) => {
  const p = pool(t, { size: 1 });
  await p.start();
  const running = p.run(request('sleep', [30]));
  await waitFor('the task to start', () => p.stats().busy === 1);
  await p.close(100);
  assert.deepEqual(await running, { outcome: 'returned', reason: 'still running at the shutdown deadline' });
});

test('replacements that keep failing to boot make the pool give up instead of looping', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'pool-boot-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const flag = join(dir, 'broken');
  const module = join(dir, 'tasks.mjs');
  writeFileSync(
    module,
    `import { existsSync } from 'node:fs';
     if (existsSync(${JSON.stringify(flag)})) throw new Error('now broken');
     export function crash() { process.exit(1); }`,
  );
  const p = pool(t, { size: 1, moduleUrl: pathToFileURL(module).href, maxBootFailures: 3 });
  await p.start();
  writeFileSync(flag, '');
  const fatal = once(p, 'fatal');
  await p.run(request('crash'));
  const [err] = (await fatal) as [ServiceError];
  assert.equal(err.code, 'ERR_WORKER_BOOT');
  assert.match(err.message, /3 times in a row.*now broken/);
  assert.equal(p.stats().idle + p.stats().starting, 0);
});
