// Per-function limits and priorities in the scheduler, against fake slots and a clock of
// our own: a function at its limit holds no worker and never blocks another; the rate is
// a sliding window; higher priorities leave the master's queue first.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { checkTaskOptions, formatRateLimit, parseRateLimit } from '../../../src/ipc/task-options.ts';
import { FuncLimits } from '../../../src/pool/func-limits.ts';
import { Job, type JobResult, type TaskRequest } from '../../../src/pool/job.ts';
import { Scheduler, type SchedulerSlot } from '../../../src/pool/scheduler.ts';
import type { SlotState } from '../../../src/pool/slot.ts';
import { taskRequest } from '../../support/task-request.ts';

/** A slot that runs one task at a time (no pipelining) and takes every func. */
class OneAtATime implements SchedulerSlot {
  funcs: ReadonlySet<string> = new Set(['a', 'b', 'limited', 'rated']);
  isUp = true;
  isLive = true;
  jobs: Job[] = [];
  get state(): SlotState {
    return this.jobs.length > 0 ? 'busy' : 'idle';
  }
  get held(): number {
    return this.jobs.length;
  }
  get running(): Job | undefined {
    return this.jobs[0];
  }
  canTake(planned: number): boolean {
    return this.jobs.length + planned < 1;
  }
  hand(jobs: Job[]): void {
    this.jobs.push(...jobs);
  }
  takeBack(): void {}
  finish(result: JobResult = { outcome: 'succeeded', resultJson: undefined, durationMs: 1 }): Job {
    const job = this.jobs.shift() as Job;
    job.end(result);
    return job;
  }
}

let nextId = 1;
function job(func: string, extra: Partial<TaskRequest> = {}, results?: JobResult[]): Job {
  return new Job(nextId++, taskRequest(func, [], { wantResult: false, ...extra }), (r) => results?.push(r));
}

function world(limits: Parameters<FuncLimits['configure']>[0]) {
  const funcLimits = new FuncLimits();
  funcLimits.configure(limits);
  const held: string[] = [];
  const wakes: number[] = [];
  const scheduler = new Scheduler({
    maxPipeline: 1,
    maxTasksPerWorker: 0,
    limits: funcLimits,
    onHeldBack: (func, limit) => held.push(`${func}:${limit}`),
    wakeIn: (ms) => wakes.push(ms),
  });
  return { funcLimits, scheduler, held, wakes };
}

test('task options: the names of the flags, in seconds; each wrong one is named with its function', () => {
  assert.deepEqual(
    checkTaskOptions('resize', {
      timeout: 1.5,
      killGrace: 0,
      maxRetries: 2,
      retryDelay: 0.5,
      retryDelayMax: 10,
      concurrency: 1,
      rateLimit: '5/s',
    }),
    {
      ok: true,
      value: {
        timeoutMs: 1500,
        killGraceMs: 0,
        maxRetries: 2,
        retryDelayMs: 500,
        retryDelayMaxMs: 10_000,
        concurrency: 1,
        rate: { count: 5, perMs: 1000 },
      },
    },
  );
  assert.deepEqual(checkTaskOptions('f', {}), { ok: true, value: {} });
  const bad: [unknown, RegExp][] = [
    [null, /^task "f": options must be an object \(got null\)/],
    [{ timeOut: 1 }, /^task "f": unknown option "timeOut" \(known: timeout, killGrace/],
    [{ timeout: 0 }, /^task "f": option timeout must be seconds, over 0/],
    [{ timeout: '30' }, /option timeout must be seconds.*got "30"/],
    [{ killGrace: -1 }, /option killGrace must be seconds, from 0/],
    [{ maxRetries: 1.5 }, /option maxRetries must be a whole number from 0 to 1000/],
    [{ concurrency: 0 }, /option concurrency must be a whole number from 1/],
    [{ rateLimit: '5 per second' }, /option rateLimit must be 'N\/s', 'N\/m' or 'N\/h'/],
    [{ rateLimit: '0/s' }, /option rateLimit/],
    [{ retryDelay: Number.NaN }, /option retryDelay must be seconds/],
  ];
  for (const [options, message] of bad) {
    const checked = checkTaskOptions('f', options);
    assert.equal(checked.ok, false, JSON.stringify(options));
    assert.match((checked as { problem: string }).problem, message);
  }
  assert.deepEqual(parseRateLimit('100/m'), { count: 100, perMs: 60_000 });
  assert.deepEqual(parseRateLimit('1/h'), { count: 1, perMs: 3_600_000 });
  for (const text of ['5/s', '100/m', '1/h'])
    assert.equal(formatRateLimit(parseRateLimit(text) as never), text);
  assert.equal(parseRateLimit('100001/s'), undefined);
});

test('concurrency: a function at its limit waits in the master; other functions pass it', () => {
  const { scheduler, held } = world({ limited: { concurrency: 1 } });
  const slots = [new OneAtATime(), new OneAtATime(), new OneAtATime()];
  const jobs = [job('limited'), job('limited'), job('a'), job('limited'), job('b')];
  for (const j of jobs) scheduler.push(j);
  scheduler.dispatch(slots);
  const running = () => slots.flatMap((s) => s.jobs.map((j) => j.request.func)).sort();
  assert.deepEqual(running(), ['a', 'b', 'limited']);
  assert.equal(scheduler.queued, 2, 'the other two limited ones wait');
  assert.equal(
    scheduler.waitingForWorker,
    false,
    'for their limit, not for a worker: acks do not wait on them',
  );
  assert.deepEqual(held, ['limited:concurrency', 'limited:concurrency'], 'each counted once');
  // The limited run ends: the next one starts, in its order.
  const limitedSlot = slots.find((s) => s.running?.request.func === 'limited') as OneAtATime;
  limitedSlot.finish();
  scheduler.dispatch(slots);
  assert.equal(limitedSlot.running, jobs[1]);
  assert.deepEqual(held, ['limited:concurrency', 'limited:concurrency'], 'not counted again');
});

test('concurrency: a place is given back when its task comes back unstarted, or ends any way', () => {
  const { scheduler, funcLimits } = world({ limited: { concurrency: 1 } });
  const slot = new OneAtATime();
  const first = job('limited');
  scheduler.push(first);
  scheduler.push(job('limited'));
  scheduler.dispatch([slot]);
  assert.equal(funcLimits.running('limited'), 1);
  // Handed back (a takeBack, a worker leaving): its place is free again.
  slot.jobs = [];
  scheduler.requeue([first]);
  assert.equal(funcLimits.running('limited'), 0);
  scheduler.dispatch([slot]);
  assert.equal(slot.running, first, 'it goes first again');
  slot.finish({ outcome: 'crashed', error: { name: 'E', message: 'x' }, durationMs: 1 });
  assert.equal(funcLimits.running('limited'), 0);
});

test('rate: a sliding window, so "5/s" never means more than 5 starts in any second', () => {
  const { scheduler, wakes, held } = world({ rated: { rate: { count: 5, perMs: 1000 } } });
  const slots = Array.from({ length: 8 }, () => new OneAtATime());
  for (let i = 0; i < 20; i++) scheduler.push(job('rated'));
  const startedAt = performance.now();
  scheduler.dispatch(slots);
  const started = () => 20 - scheduler.queued;
  assert.equal(started(), 5, 'a burst of the limit');
  // The wake is rounded up to whole ms (never early): 1000 ms, or 1001 when the clock's
  // floating-point sum lands a hair over.
  assert.ok(wakes.length === 1 && (wakes[0] as number) > 900 && (wakes[0] as number) <= 1001, `${wakes}`);
  assert.deepEqual(held, Array(15).fill('rated:rate'));
  for (const s of slots) if (s.running !== undefined) s.finish();
  scheduler.dispatch(slots);
  // (Unless this machine stalled for the whole second meanwhile: then the window has moved.)
  if (performance.now() - startedAt < 900)
    assert.equal(started(), 5, 'finished runs do not make room: the window does');
});

test('rate: property: over any arrival times, no window of perMs holds more than count starts', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 5 }),
      fc.array(fc.integer({ min: 0, max: 3000 }), { minLength: 1, maxLength: 60 }),
      (count, times) => {
        const limits = new FuncLimits();
        limits.configure({ f: { rate: { count, perMs: 1000 } } });
        const starts: number[] = [];
        for (const now of [...times].sort((a, b) => a - b)) {
          if (limits.blocked('f', now) !== undefined) continue;
          limits.take('f', now)?.release();
          starts.push(now);
        }
        for (const at of starts) {
          const inWindow = starts.filter((s) => s >= at && s < at + 1000).length;
          if (inWindow > count) return false;
        }
        return true;
      },
    ),
  );
});

test('a reload that changes the limits applies them from then on; one that drops them frees the function', () => {
  const limits = new FuncLimits();
  limits.configure({ f: { concurrency: 1 } });
  const place = limits.take('f', 0);
  assert.equal(limits.blocked('f', 0), 'concurrency');
  limits.configure({ f: { concurrency: 2 } });
  assert.equal(limits.blocked('f', 0), undefined, 'the running one counts against the new limit');
  limits.configure({});
  assert.equal(limits.active, false);
  assert.equal(limits.blocked('f', 0), undefined);
  place?.release();
  assert.equal(limits.running('f'), 0);
});

test('priorities: higher first, arrival order within one; a give-back returns to the front of its priority', () => {
  const { scheduler } = world({});
  const order: Job[] = [];
  const p = (priority: number) => {
    const j = job('a', { priority });
    order.push(j);
    scheduler.push(j);
    return j;
  };
  const low1 = p(0);
  const low2 = p(0);
  const high1 = p(9);
  const mid = p(5);
  const high2 = p(9);
  const slot = new OneAtATime();
  const ran: Job[] = [];
  for (let i = 0; i < 5; i++) {
    scheduler.dispatch([slot]);
    ran.push(slot.finish());
  }
  assert.deepEqual(ran, [high1, high2, mid, low1, low2]);
  // Given back unstarted: ahead of its equals, behind higher ones.
  const a = p(5);
  const b = p(9);
  scheduler.dispatch([slot]);
  assert.equal(slot.running, b);
  slot.jobs = [];
  const c = p(5);
  scheduler.requeue([b]);
  scheduler.dispatch([slot]);
  assert.equal(slot.finish(), b);
  scheduler.dispatch([slot]);
  assert.equal(slot.finish(), a);
  scheduler.dispatch([slot]);
  assert.equal(slot.finish(), c);
});

test('a cancelled task in the queue ends cancelled, unrun; remove takes one out', () => {
  const { scheduler } = world({});
  const results: JobResult[] = [];
  const cancelled = job('a', { messageId: 'x' }, results);
  cancelled.cancelled = true;
  scheduler.push(cancelled);
  const other = job('a');
  scheduler.push(other);
  const slot = new OneAtATime();
  scheduler.dispatch([slot]);
  assert.equal(results[0]?.outcome, 'cancelled');
  assert.equal(slot.running, other);
  const waiting = job('b');
  scheduler.push(waiting);
  assert.equal(
    scheduler.remove((j) => j === waiting),
    waiting,
  );
  assert.equal(scheduler.queued, 0);
});

test("a task held back past maxHeldBackMs goes back with a delay, never held into the broker's consumer timeout", () => {
  const funcLimits = new FuncLimits();
  funcLimits.configure({ limited: { concurrency: 1 } });
  const wakes: number[] = [];
  const scheduler = new Scheduler({
    maxPipeline: 1,
    maxTasksPerWorker: 0,
    limits: funcLimits,
    maxHeldBackMs: 60_000,
    wakeIn: (ms) => wakes.push(ms),
  });
  const results: JobResult[] = [];
  const first = job('limited');
  const second = job('limited', {}, results);
  scheduler.push(first);
  scheduler.push(second);
  const slots = [new OneAtATime(), new OneAtATime()];
  scheduler.dispatch(slots);
  assert.equal(scheduler.queued, 1);
  assert.ok(
    wakes.some((ms) => ms > 59_000 && ms <= 60_000),
    'woken when its wait runs out',
  );
  second.queuedAt -= 61_000; // it has waited a minute already
  scheduler.dispatch(slots);
  assert.equal(scheduler.queued, 0);
  assert.equal(results[0]?.outcome, 'returned');
  assert.ok(results[0]?.outcome === 'returned' && (results[0].delayMs as number) >= 1_000);
});

test('a limited function is never queued behind a running task: it goes to a worker that holds nothing', () => {
  const funcLimits = new FuncLimits();
  funcLimits.configure({ limited: { concurrency: 1 } });
  const scheduler = new Scheduler({ maxPipeline: 64, maxTasksPerWorker: 0, limits: funcLimits });
  /** A worker that would take a pipeline of 64. */
  const deep = (): OneAtATime & { canTake: (planned: number) => boolean } => {
    const slot = new OneAtATime();
    slot.canTake = (planned: number) => slot.jobs.length + planned < 64;
    return slot;
  };
  const busy = deep();
  busy.jobs.push(job('a'));
  const idle = deep();
  scheduler.push(job('limited'));
  scheduler.dispatch([busy]);
  assert.equal(scheduler.queued, 1, 'not behind the running task');
  scheduler.dispatch([busy, idle]);
  assert.equal(idle.running?.request.func, 'limited');
  assert.equal(busy.held, 1);
});
