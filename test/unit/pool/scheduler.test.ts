// The scheduler against fake slots: placement, pipelining depth, give-back and
// rebalancing, without a process or a timer.
import assert from 'node:assert/strict';
import { mock, test } from 'node:test';
import fc from 'fast-check';
import { mayHoldMore } from '../../../src/pool/hold-rule.ts';
import { Job, type JobResult } from '../../../src/pool/job.ts';
import { Scheduler, type SchedulerSlot } from '../../../src/pool/scheduler.ts';
import type { SlotState } from '../../../src/pool/slot.ts';
import { taskRequest } from '../../support/task-request.ts';

// One clock for the scheduler and the fake slots, and it stands still: a task's age is what
// a test sets, never how long this machine took between two lines. On a busy machine that
// is a few milliseconds, and the thresholds under test are 2, 5 and 30 ms.
mock.method(performance, 'now', () => 1_000_000);

class FakeSlot implements SchedulerSlot {
  readonly name: string;
  funcs: ReadonlySet<string>;
  isUp = true;
  isLive = true;
  /** Tasks held: the first runs. */
  jobs: Job[] = [];
  /** How many it may hold at once, whatever the depth. */
  capacity: number;
  hands: Job[][] = [];
  takeBacks = 0;

  constructor(name: string, funcs: string[] = ['f'], capacity = 64) {
    this.name = name;
    this.funcs = new Set(funcs);
    this.capacity = capacity;
  }
  get state(): SlotState {
    if (!this.isUp) return 'starting';
    return this.jobs.length > 0 ? 'busy' : 'idle';
  }
  get held(): number {
    return this.jobs.length;
  }
  get running(): Job | undefined {
    return this.jobs[0];
  }
  canTake(planned: number, depth: number, now: number, _maxTasks: number, longMs: number): boolean {
    const load = this.jobs.length + planned;
    const running = this.jobs[0];
    const ranMs = running === undefined ? undefined : now - running.startedAt;
    return this.isUp && load < this.capacity && mayHoldMore(load, depth, ranMs, longMs);
  }
  hand(jobs: Job[]): void {
    this.hands.push(jobs);
    if (this.jobs.length === 0 && jobs[0] !== undefined) jobs[0].startedAt = performance.now();
    this.jobs.push(...jobs);
  }
  takeBack(): void {
    this.takeBacks++;
  }
  /** The running task ends, and the next starts (as Slot stamps it). */
  finish(): Job | undefined {
    const done = this.jobs.shift();
    if (this.jobs[0] !== undefined) this.jobs[0].startedAt = performance.now();
    return done;
  }
}

let nextId = 1;
function job(func = 'f', abandoned = false): { job: Job; results: JobResult[] } {
  const results: JobResult[] = [];
  const j = new Job(nextId++, taskRequest(func, [], { wantResult: false, abandoned: () => abandoned }), (r) =>
    results.push(r),
  );
  return { job: j, results };
}

const scheduler = (maxPipeline = 64, maxTasksPerWorker = 0) =>
  new Scheduler({ maxPipeline, maxTasksPerWorker });

test('untimed tasks: one per slot least loaded first, then the next behind each, the rest wait in order', () => {
  const s = scheduler();
  const a = new FakeSlot('a');
  const b = new FakeSlot('b');
  const jobs = [job(), job(), job(), job(), job()].map((j) => j.job);
  for (const j of jobs) s.push(j);
  assert.equal(s.dispatch([a, b]), true);
  assert.deepEqual(
    [a.jobs, b.jobs],
    [
      [jobs[0], jobs[2]],
      [jobs[1], jobs[3]],
    ],
  );
  assert.equal(s.queued, 1);
  assert.equal(s.waitingForWorker, true, 'every slot is full: the one left waits only for a worker');
  a.finish();
  s.dispatch([a, b]);
  assert.deepEqual(a.jobs, [jobs[2], jobs[4]]);
  assert.equal(s.queued, 0);
  assert.equal(s.waitingForWorker, false);
});

test('maxPipeline 1: one task per slot, none held ahead', () => {
  const s = scheduler(1);
  const a = new FakeSlot('a');
  for (let i = 0; i < 3; i++) s.push(job().job);
  s.dispatch([a]);
  assert.equal(a.held, 1);
  assert.equal(s.queued, 2);
});

test('tiny tasks pipeline: one hand() carries a batch, no deeper than maxPipeline', () => {
  const s = scheduler(8);
  for (let i = 0; i < 20; i++) s.recordRun(0.01);
  const a = new FakeSlot('a');
  for (let i = 0; i < 30; i++) s.push(job().job);
  s.dispatch([a]);
  assert.equal(a.hands.length, 1, 'one message to the child');
  assert.equal(a.held, 8);
  assert.equal(s.queued, 22);
});

test('tiny tasks are packed: the busiest slot that can take them first, the next only once it is full', () => {
  const s = scheduler(8);
  for (let i = 0; i < 20; i++) s.recordRun(0.01);
  const a = new FakeSlot('a');
  const b = new FakeSlot('b');
  for (let i = 0; i < 3; i++) s.push(job().job);
  s.dispatch([a, b]);
  assert.deepEqual([a.held, b.held], [3, 0], 'a few tiny tasks wake one worker, not both');
  // Past a's depth (8), the rest go to b: packing never keeps a task waiting here.
  for (let i = 0; i < 10; i++) s.push(job().job);
  s.dispatch([a, b]);
  assert.deepEqual([a.held, b.held, s.queued], [8, 5, 0]);
  // Both down to half their depth (4) or less, so both may be topped up: b, the busier, is.
  for (let i = 0; i < 6; i++) a.finish();
  b.finish();
  s.push(job().job);
  s.dispatch([a, b]);
  assert.deepEqual([a.held, b.held], [2, 5]);
});

test('packing starts under 0.05 ms a task: 0.049 ms packs, 0.051 ms spreads', () => {
  for (const [ms, expected] of [
    [0.049, [4, 0]],
    [0.051, [2, 2]],
  ] as const) {
    const s = scheduler(8);
    for (let i = 0; i < 20; i++) s.recordRun(ms);
    const a = new FakeSlot('a');
    const b = new FakeSlot('b');
    for (let i = 0; i < 4; i++) s.push(job().job);
    s.dispatch([a, b]);
    assert.deepEqual([a.held, b.held], expected, `${ms} ms`);
  }
});

test('tiny tasks are not packed behind a running task past the pipeline budget: the idle slot takes them', () => {
  // Under the budget (2 ms) a's running task is still packed onto; from it on, it may be
  // turning out long (200 times the average), and what comes goes to the idle slot.
  for (const [ranMs, expected] of [
    [1.9, [5, 0]],
    [2, [1, 4]],
  ] as const) {
    const s = scheduler(8);
    for (let i = 0; i < 20; i++) s.recordRun(0.01);
    const a = new FakeSlot('a');
    const b = new FakeSlot('b');
    s.push(job().job);
    s.dispatch([a, b]);
    assert.deepEqual([a.held, b.held], [1, 0]);
    (a.running as Job).startedAt = performance.now() - ranMs;
    for (let i = 0; i < 4; i++) s.push(job().job);
    s.dispatch([a, b]);
    assert.deepEqual([a.held, b.held], expected, `a's task has run ${ranMs} ms`);
  }
});

test('long tasks do not pipeline: each slot holds the running one and the next', () => {
  const s = scheduler(64);
  s.recordRun(500);
  const a = new FakeSlot('a');
  for (let i = 0; i < 3; i++) s.push(job().job);
  s.dispatch([a]);
  assert.equal(a.held, 2);
  assert.equal(s.queued, 1);
});

test('a running task that has turned out long (3 × the average) takes nothing behind it', () => {
  const s = scheduler(64);
  s.recordRun(10);
  const a = new FakeSlot('a');
  a.hand([job().job]);
  (a.jobs[0] as Job).startedAt = performance.now() - 29.9;
  s.push(job().job);
  s.dispatch([a]);
  assert.equal(a.held, 2, 'at 29.9 ms of a 10 ms average, the next goes behind it');
  a.jobs.pop();
  (a.jobs[0] as Job).startedAt = performance.now() - 30;
  s.push(job().job);
  s.dispatch([a]);
  assert.equal(a.held, 1, 'at 30 ms, it waits here for a worker that will be free sooner');
  assert.equal(s.queued, 1);
});

test('a task held behind one turned long is taken back for a worker that will be free sooner, with tasks queued', () => {
  const s = scheduler(64);
  s.recordRun(10);
  const stuck = new FakeSlot('stuck');
  stuck.hand([job().job, job().job]);
  (stuck.jobs[0] as Job).startedAt = performance.now() - 60_000;
  const busy = new FakeSlot('busy');
  busy.hand([job().job, job().job]);
  for (let i = 0; i < 3; i++) s.push(job().job);
  s.dispatch([stuck, busy]);
  assert.equal(stuck.takeBacks, 0, 'the other worker holds its next already: nobody is sooner');
  busy.finish(); // it runs its next, just started, and holds nothing behind it
  s.dispatch([stuck, busy]);
  assert.equal(busy.held, 2, 'a newer task went behind it');
  assert.equal(
    stuck.takeBacks,
    1,
    'while queued tasks keep the other worker busy, the held one is taken back',
  );
});

test('during a reload, a task goes to a slot whose code exports its func, never another', () => {
  const s = scheduler();
  const old = new FakeSlot('old', ['f']);
  const fresh = new FakeSlot('new', ['f', 'g'], 1);
  fresh.jobs.push(job('g').job); // busy, and holds no more
  const g = job('g').job;
  const f = job('f').job;
  s.push(g);
  s.push(f);
  s.dispatch([old, fresh]);
  assert.deepEqual(old.jobs, [f], 'f passed g, which waits for the slot that knows it');
  assert.equal(s.queued, 1);
  assert.equal(s.waitingForWorker, false, 'g was passed over while a worker had room');
  fresh.finish();
  s.dispatch([old, fresh]);
  assert.deepEqual(fresh.jobs, [g]);
});

test('a func no slot exports goes to any slot (its child answers: unknown func)', () => {
  const s = scheduler();
  const a = new FakeSlot('a', ['f']);
  const nope = job('nope').job;
  s.push(nope);
  s.dispatch([a]);
  assert.deepEqual(a.jobs, [nope]);
});

test('nobody can take anything: the queue is left as it was', () => {
  const s = scheduler();
  const a = new FakeSlot('a');
  a.isUp = false;
  const jobs = [job(), job()].map((j) => j.job);
  for (const j of jobs) s.push(j);
  assert.equal(s.dispatch([a]), false);
  assert.equal(s.queued, 2);
});

test('an abandoned task is given back at dispatch, never handed out', () => {
  const s = scheduler();
  const a = new FakeSlot('a');
  const dead = job('f', true);
  const live = job('f');
  s.push(dead.job);
  s.push(live.job);
  s.dispatch([a]);
  assert.deepEqual(a.jobs, [live.job]);
  assert.deepEqual(dead.results, [{ outcome: 'returned', reason: 'its channel closed before it started' }]);
});

test('give-back takes the newest first; requeue puts tasks back at the front, in order', () => {
  const s = scheduler();
  const made = [job(), job(), job(), job()];
  for (const m of made) s.push(m.job);
  assert.equal(s.giveBack(2, 'window shrank'), 2);
  assert.deepEqual(
    made.map((m) => m.results.length),
    [0, 0, 1, 1],
  );
  const back = [job().job, job().job];
  s.requeue(back);
  const a = new FakeSlot('a', ['f'], 1);
  const b = new FakeSlot('b', ['f'], 1);
  s.dispatch([a, b]);
  assert.deepEqual([a.jobs[0], b.jobs[0]], back);
  s.endAllUnrun('drain');
  assert.equal(s.queued, 0);
  assert.equal(made[0]?.results[0]?.outcome, 'returned');
});

test('an idle slot with nothing queued takes back what waits behind a long task elsewhere', async () => {
  const s = scheduler();
  const idle = new FakeSlot('idle');
  const stuck = new FakeSlot('stuck');
  stuck.hand([job().job, job().job]);
  (stuck.jobs[0] as Job).startedAt = performance.now() - 1_000;
  s.dispatch([idle, stuck]);
  assert.equal(stuck.takeBacks, 1);
  const short = new FakeSlot('short');
  short.hand([job().job, job().job]);
  s.dispatch([idle, short]);
  assert.equal(short.takeBacks, 0, 'a task that just started is not long');
});

test('over any mix of slots and tasks, every task is handed once or still queued, in order per slot', () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.record({
          funcs: fc.subarray(['f', 'g', 'h'], { minLength: 1 }),
          up: fc.boolean(),
          cap: fc.integer({ min: 1, max: 4 }),
        }),
        {
          minLength: 1,
          maxLength: 5,
        },
      ),
      fc.array(fc.constantFrom('f', 'g', 'h', 'x'), { maxLength: 40 }),
      fc.option(fc.double({ min: 0.001, max: 100, noNaN: true })),
      (slotSpecs, funcs, avg) => {
        const s = scheduler(8);
        if (avg !== null) s.recordRun(avg);
        const slots = slotSpecs.map((spec, i) => {
          const slot = new FakeSlot(`s${i}`, spec.funcs, spec.cap);
          slot.isUp = spec.up;
          return slot;
        });
        const jobs = funcs.map((f) => job(f).job);
        for (const j of jobs) s.push(j);
        s.dispatch(slots);
        const handed = slots.flatMap((slot) => slot.jobs);
        assert.equal(handed.length + s.queued, jobs.length);
        assert.equal(new Set(handed).size, handed.length);
        for (const slot of slots) {
          if (!slot.isUp) assert.equal(slot.held, 0);
          assert.ok(slot.held <= slot.capacity);
          const ids = slot.jobs.map((j) => j.taskId);
          assert.deepEqual(
            ids,
            [...ids].sort((x, y) => x - y),
            'a slot gets its tasks in queue order',
          );
          const knownAnywhere = (f: string) => slots.some((o) => o.isUp && o.funcs.has(f));
          for (const j of slot.jobs)
            assert.ok(slot.funcs.has(j.request.func) || !knownAnywhere(j.request.func));
        }
      },
    ),
  );
});
