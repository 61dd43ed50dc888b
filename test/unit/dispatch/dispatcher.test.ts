// The dispatcher's settlement and dedupe paths, with a fake consumer, pool and publisher:
// every delivery gets exactly one answer (ack, or requeue counted or not), whatever
// fails on the way, and the dedupe memory never acks a message that did not run.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { ConsumeMessage } from 'amqplib';
import pino from 'pino';
import { Registry } from 'prom-client';
import type { Delivery } from '../../../src/amqp/delivery.ts';
import type { ConsumerSession } from '../../../src/amqp/session.ts';
import { CrashJournal, crashKey } from '../../../src/dispatch/crash-journal.ts';
import { Dispatcher, type DispatcherOptions } from '../../../src/dispatch/dispatcher.ts';
import { finishedMemo } from '../../../src/dispatch/work.ts';
import { createMetrics } from '../../../src/metrics/metrics.ts';
import type { JobResult, TaskRequest } from '../../../src/pool/pool.ts';

let nextTag = 1;
/** Stands for a consuming session: only its identity matters to the dispatcher. */
const liveSession = {} as ConsumerSession;

function delivery(
  body: unknown,
  opts: { messageId?: string; redelivered?: boolean; attempts?: number; session?: ConsumerSession } = {},
): Delivery {
  const message = {
    content: Buffer.from(JSON.stringify(body)),
    fields: {
      deliveryTag: nextTag++,
      redelivered: opts.redelivered ?? false,
      routingKey: 'rk',
      exchange: 'x',
    },
    properties: {
      messageId: opts.messageId,
      headers: opts.attempts === undefined ? {} : { 'x-attempts': opts.attempts },
    },
  } as unknown as ConsumeMessage;
  return { message, session: opts.session ?? liveSession };
}

type Answer = { tag: number; how: 'ack' | 'requeue' | 'reject' };

/** A world of fakes; `run` decides what each task does, `publish` what each publish does. */
function world(
  run: (request: TaskRequest) => Promise<JobResult>,
  publish: () => Promise<void> = async () => {},
  overrides: Partial<DispatcherOptions> = {},
) {
  const answers: Answer[] = [];
  const requests: TaskRequest[] = [];
  const running = new Set<TaskRequest>();
  let live = liveSession;
  const consumer = {
    isLive: (d: Delivery) => d.session === live,
    ack(d: Delivery) {
      if (d.session !== live) return false;
      answers.push({ tag: d.message.fields.deliveryTag, how: 'ack' });
      return true;
    },
    requeue(d: Delivery, counted = false) {
      if (d.session !== live) return false;
      answers.push({ tag: d.message.fields.deliveryTag, how: counted ? 'reject' : 'requeue' });
      return true;
    },
  };
  const metrics = createMetrics(new Registry(), { defaultMetrics: false });
  const dispatcher = new Dispatcher({
    pool: {
      funcs: new Set(['add']),
      limits: {},
      submit: (request: TaskRequest, onEnd: (result: JobResult) => void) => {
        requests.push(request);
        running.add(request);
        void run(request).then((result) => {
          running.delete(request);
          onEnd(result);
        });
      },
      /** As the pool says: the tasks handed over whose result has not come. */
      running: () => [...running],
    } as unknown as DispatcherOptions['pool'],
    consumer,
    publisher: { publish },
    metrics,
    logger: pino({ level: 'silent' }),
    queue: 'q',
    deadLetterQueue: 'q.dead',
    maxMessageBytes: 1024,
    retryDelaysMs: [],
    ...overrides,
  });
  return {
    dispatcher,
    answers,
    requests,
    metrics,
    /** The session dies: its deliveries can no longer be settled. */
    loseChannel: () => {
      live = {} as ConsumerSession;
      return live;
    },
    settled: () => new Promise<void>((resolve) => setImmediate(() => setImmediate(resolve))),
  };
}

/** A crash journal (limit 3) in a directory of its own, removed at teardown. */
function tempJournal(t: { after: (fn: () => unknown) => void }): CrashJournal {
  const dir = mkdtempSync(join(tmpdir(), 'journal-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return new CrashJournal(join(dir, 'q.json'), 3);
}

/** A pool whose tasks end only when the test says: `finish` ends the latest one. */
function heldRuns() {
  let last: (r: JobResult) => void = () => {};
  return {
    run: () =>
      new Promise<JobResult>((resolve) => {
        last = resolve;
      }),
    finish: (r: JobResult) => last(r),
  };
}

/** A world that renews adopted redeliveries; `published` records each renewal copy, `fail` makes its publish fail. */
function renewingWorld(run: (request: TaskRequest) => Promise<JobResult>, fail: () => boolean = () => false) {
  const published: { routingKey: string; headers: Record<string, unknown> }[] = [];
  const w = world(
    run,
    async (...args: unknown[]) => {
      const [, routingKey, , options] = args as [
        string,
        string,
        Buffer,
        { headers: Record<string, unknown> },
      ];
      published.push({ routingKey, headers: options.headers });
      if (fail()) throw new Error('publish failed');
    },
    { renewAdopted: true },
  );
  const tokens = () => published.map((p) => p.headers['x-adopted-copy']);
  return { w, published, tokens };
}

/**
 * A message that runs here, its session lost, and its redelivery on the new session
 * (handled: adopted by the run). Returns the new session and the redelivery.
 */
function redeliveredWhileRunning(w: ReturnType<typeof world>, messageId: string) {
  w.dispatcher.handle(delivery({ func: 'add' }, { messageId }));
  const ch = w.loseChannel();
  const again = delivery({ func: 'add' }, { messageId, redelivered: true, session: ch });
  w.dispatcher.handle(again);
  return { ch, again };
}

/** A delivery carrying a renewal token, as a copy comes back from the queue. */
function copyWith(token: unknown, messageId: string, session: ConsumerSession): Delivery {
  const d = delivery({ func: 'add' }, { messageId, session });
  (d.message.properties.headers as Record<string, unknown>)['x-adopted-copy'] = token;
  return d;
}

const ok: JobResult = { outcome: 'succeeded', resultJson: undefined, durationMs: 1 };
const crashed: JobResult = {
  outcome: 'crashed',
  error: { name: 'WorkerCrashed', message: 'died', code: 'ERR_WORKER_CRASHED' },
  durationMs: 1,
};

test('a failure inside settlement still ends in exactly one answer: a counted requeue', async () => {
  const w = world(async () => ok);
  // Recording the outcome throws (a bug of ours, say): the delivery must not be left unacked.
  w.metrics.tasks.record = () => {
    throw new Error('metrics broke');
  };
  const d = delivery({ func: 'add', args: [1, 2] });
  w.dispatcher.handle(d);
  await w.settled();
  // The ack had gone out before the throw: no second answer for the same tag.
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'ack' }]);
  assert.equal(w.dispatcher.inFlight, 0);

  const w2 = world(
    async () => crashed,
    async () => {
      throw new Error('no broker');
    },
  );
  const d2 = delivery({ func: 'add' });
  w2.dispatcher.handle(d2);
  await w2.settled();
  // The dead letter of a crash was not confirmed: back, counted towards a delivery limit.
  assert.deepEqual(w2.answers, [{ tag: d2.message.fields.deliveryTag, how: 'reject' }]);
  assert.equal(w2.dispatcher.inFlight, 0);
});

test('a settlement that throws before answering gives the delivery back, counted', async () => {
  const w = world(
    async () => ({ outcome: 'failed', error: undefined, durationMs: 1 }) as unknown as JobResult,
  );
  const d = delivery({ func: 'add' });
  w.dispatcher.handle(d);
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'reject' }]);
  assert.equal(w.dispatcher.inFlight, 0);
});

test('a message that finished while its channel died is acked unrun when it comes back, and only that one', async () => {
  const first = delivery({ func: 'add' }, { messageId: 'm1' });
  const held = heldRuns();
  const finish = held.finish;
  const w2 = world(held.run);
  w2.dispatcher.handle(first);
  const newChannel = w2.loseChannel();
  finish(ok); // finished, but its ack cannot reach the broker
  await w2.settled();
  assert.deepEqual(w2.answers, []);
  // The same delivery comes back: acked, not run again.
  const again = delivery({ func: 'add' }, { messageId: 'm1', redelivered: true, session: newChannel });
  w2.dispatcher.handle(again);
  assert.deepEqual(w2.answers, [{ tag: again.message.fields.deliveryTag, how: 'ack' }]);
  assert.equal(w2.requests.length, 1);
  // A retry copy keeps the message id but is another attempt: it runs.
  const retry = delivery(
    { func: 'add' },
    { messageId: 'm1', redelivered: true, attempts: 1, session: newChannel },
  );
  w2.dispatcher.handle(retry);
  assert.equal(w2.requests.length, 2);
});

test('the dedupe memory expires: a message id seen long ago runs again', async () => {
  let now = 0;
  // A memory whose clock we drive.
  const { RecentIds } = await import('../../../src/dispatch/recent-ids.ts');
  const memory = new RecentIds(10, 1_000, () => now);
  memory.add('a');
  now = 999;
  assert.equal(memory.has('a'), true);
  now = 1_001;
  assert.equal(memory.has('a'), false);
  assert.equal(memory.size, 0);
  // And through the dispatcher: ttl 0 forgets at once.
  const held = heldRuns();
  const w0 = world(held.run, undefined, { recentIdsTtlMs: 0 });
  w0.dispatcher.handle(delivery({ func: 'add' }, { messageId: 'm2' }));
  const ch = w0.loseChannel();
  held.finish(ok);
  await w0.settled();
  w0.dispatcher.handle(delivery({ func: 'add' }, { messageId: 'm2', redelivered: true, session: ch }));
  assert.equal(w0.requests.length, 2, 'forgotten: it runs');
});

test('a redelivery of a message still running is not run again, and the run settles the new delivery', async () => {
  const held = heldRuns();
  const finish = held.finish;
  const w = world(held.run);
  const { again } = redeliveredWhileRunning(w, 'm3');
  assert.equal(w.requests.length, 1);
  // The running request is no longer abandoned: its message's live delivery took over.
  assert.equal(w.requests[0]?.abandoned?.(), false);
  finish(ok);
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: again.message.fields.deliveryTag, how: 'ack' }]);
});

test('renewal (quorum with a delivery limit): an adopted redelivery is copied back, acked once the copy is confirmed, and the copy settles the run', async () => {
  const held = heldRuns();
  const { w, published } = renewingWorld(held.run);
  const { ch, again } = redeliveredWhileRunning(w, 'm9');
  await w.settled();
  // The copy went straight back to the work queue, with a token; then the redelivery was acked.
  assert.equal(published.length, 1);
  assert.equal(published[0]?.routingKey, 'q');
  const token = published[0]?.headers['x-adopted-copy'];
  assert.equal(typeof token, 'string');
  assert.equal(published[0]?.headers['x-original-routing-key'], 'rk');
  assert.deepEqual(w.answers, [{ tag: again.message.fields.deliveryTag, how: 'ack' }]);
  // The copy arrives: adopted, not run.
  const copy = copyWith(token, 'm9', ch);
  w.dispatcher.handle(copy);
  assert.equal(w.requests.length, 1, 'never run twice');
  held.finish(ok);
  await w.settled();
  assert.deepEqual(w.answers.at(-1), { tag: copy.message.fields.deliveryTag, how: 'ack' });
  assert.equal(w.answers.length, 2, 'each delivery answered once');
  assert.equal(w.dispatcher.inFlight, 0);
});

test('renewal: a copy that arrives after the run ended is acked unrun; a stranger copy runs', async () => {
  const held = heldRuns();
  const { w, tokens } = renewingWorld(held.run);
  const { ch } = redeliveredWhileRunning(w, 'm10');
  await w.settled();
  held.finish(ok);
  await w.settled();
  assert.equal(w.answers.length, 1, 'the renewed redelivery only: the run ended before its copy came');
  const late = copyWith(tokens()[0], 'm10', ch);
  w.dispatcher.handle(late);
  assert.equal(w.requests.length, 1, 'not run again');
  assert.deepEqual(w.answers.at(-1), { tag: late.message.fields.deliveryTag, how: 'ack' });
  // A copy another service made (its token unknown here) is a message like any other.
  const stranger = copyWith('elsewhere.1', 'm11', ch);
  w.dispatcher.handle(stranger);
  assert.equal(w.requests.length, 2);
});

test('renewal: a failed publish keeps the redelivery; its copy, if it came anyway, is acked unrun; one renewal at a time', async () => {
  const held = heldRuns();
  let fail = true;
  const { w, tokens } = renewingWorld(held.run, () => fail);
  w.dispatcher.handle(delivery({ func: 'add' }, { messageId: 'm12' }));
  let ch = w.loseChannel();
  const again = delivery({ func: 'add' }, { messageId: 'm12', redelivered: true, session: ch });
  w.dispatcher.handle(again);
  await w.settled();
  assert.deepEqual(w.answers, [], 'not acked: the copy was not confirmed');
  // The copy reached the queue after all: the redelivery is still the message here.
  const stray = copyWith(tokens()[0], 'm12', ch);
  w.dispatcher.handle(stray);
  assert.deepEqual(w.answers, [{ tag: stray.message.fields.deliveryTag, how: 'ack' }]);
  // The session dies again: the next redelivery is renewed, this time confirmed.
  fail = false;
  ch = w.loseChannel();
  const third = delivery({ func: 'add' }, { messageId: 'm12', redelivered: true, session: ch });
  w.dispatcher.handle(third);
  // A fourth delivery while that renewal is in flight starts no second one.
  await w.settled();
  assert.equal(tokens().length, 2);
  assert.deepEqual(w.answers.at(-1), { tag: third.message.fields.deliveryTag, how: 'ack' });
  held.finish(ok);
  await w.settled();
  // Renewed and then finished before the copy came: nothing more to ack now; the copy will be.
  assert.equal(w.answers.length, 2);
  assert.equal(w.requests.length, 1);
  assert.equal(w.dispatcher.inFlight, 0);
});

test('renewal: a copy that comes during a drain is still recognised, not given back', async () => {
  const held = heldRuns();
  const { w, tokens } = renewingWorld(held.run);
  const { ch } = redeliveredWhileRunning(w, 'm13');
  await w.settled();
  const drained = w.dispatcher.drain();
  const copy = copyWith(tokens()[0], 'm13', ch);
  w.dispatcher.handle(copy);
  held.finish(ok);
  await drained;
  assert.deepEqual(
    w.answers.map((a) => a.how),
    ['ack', 'ack'],
    'the renewed redelivery, then the copy by the run: never a give-back of the copy',
  );
  assert.deepEqual(w.answers.at(-1), { tag: copy.message.fields.deliveryTag, how: 'ack' });
});

test('a task of a channel that died is abandoned before it starts; a give-back is not counted', async () => {
  const held = heldRuns();
  const finish = held.finish;
  const w = world(held.run);
  const d = delivery({ func: 'add' });
  w.dispatcher.handle(d);
  assert.equal(w.requests[0]?.abandoned?.(), false);
  finish({ outcome: 'returned', reason: 'drain' });
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'requeue' }]);
  const d2 = delivery({ func: 'add' });
  w.dispatcher.handle(d2);
  w.loseChannel();
  assert.equal(w.requests[1]?.abandoned?.(), true);
});

test('an unroutable dead letter gives the original back instead of acking it', async () => {
  const { UnroutableError } = await import('../../../src/errors.ts');
  const w = world(
    async () => ({ outcome: 'failed', error: { name: 'Error', message: 'nope' }, durationMs: 1 }),
    async () => {
      throw new UnroutableError('', 'q.dead', 'NO_ROUTE');
    },
  );
  const d = delivery({ func: 'add' });
  w.dispatcher.handle(d);
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'reject' }]);
});

test('a message the master died on three times is dead-lettered as crashed when it comes back, unrun', async (t) => {
  const journal = tempJournal(t);
  const published: { routingKey: string; headers: Record<string, unknown> }[] = [];
  const w = world(
    async () => ok,
    async () => {},
    {
      crashJournal: journal,
      publisher: {
        publish: async (
          _e: string,
          routingKey: string,
          _c: Buffer,
          options: { headers?: Record<string, unknown> },
        ) => {
          published.push({ routingKey, headers: options.headers ?? {} });
        },
      } as unknown as DispatcherOptions['publisher'],
    },
  );
  const bomb = delivery({ func: 'add', args: [1] }, { redelivered: true });
  const key = crashKey(undefined, bomb.message.content);
  journal.suspect(key);
  journal.suspect(key);
  // Two deaths: it still gets its chance.
  w.dispatcher.handle(bomb);
  assert.equal(w.requests.length, 1);
  journal.suspect(key);
  const again = delivery({ func: 'add', args: [1] }, { redelivered: true });
  w.dispatcher.handle(again);
  await w.settled();
  assert.equal(w.requests.length, 1, 'not run a fourth time');
  assert.deepEqual(
    published.map((p) => [p.routingKey, p.headers['x-error-kind']]),
    [['q.dead', 'crashed']],
  );
  assert.deepEqual(w.answers.at(-1), { tag: again.message.fields.deliveryTag, how: 'ack' });
  assert.equal(journal.deaths(key), 0, 'forgotten once settled');
});

test('the last resort writes down the delivery being handled, or else every one running', async (t) => {
  const journal = tempJournal(t);
  const d = delivery({ func: 'add' }, { messageId: 'boom' });
  const w = world(
    () => {
      // The pool throws synchronously while this delivery is handled: the last resort,
      // called from inside (as an uncaught error's handler would be), sees it.
      w.dispatcher.recordCrash();
      throw new Error('the pool broke');
    },
    undefined,
    { crashJournal: journal },
  );
  w.dispatcher.handle(d);
  assert.equal(journal.deaths(crashKey('boom', d.message.content)), 1);
  // Outside of handling, nothing is on the stack, and nothing runs: nothing is written.
  w.dispatcher.recordCrash();
  assert.equal(journal.deaths(crashKey('boom', d.message.content)), 1);
  // And the throw ended that delivery alone: dead-lettered as crashed, then acked.
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'ack' }]);
  assert.equal(w.dispatcher.inFlight, 0);
});

test('a dead letter the broker can never take is replaced by a cleaned copy, and the original acked once', async () => {
  const { PublishRefusedError } = await import('../../../src/errors.ts');
  const published: Record<string, unknown>[] = [];
  const w = world(
    async () => ({ outcome: 'failed', error: { name: 'Error', message: 'nope' }, durationMs: 1 }),
    async () => {},
    {
      publisher: {
        publish: async (
          _e: string,
          _k: string,
          _c: Buffer,
          options: { headers?: Record<string, unknown> },
        ) => {
          published.push(options.headers ?? {});
          if ('huge' in (options.headers ?? {}))
            throw new PublishRefusedError('it cannot be encoded: out of range');
        },
      } as unknown as DispatcherOptions['publisher'],
    },
  );
  const d = delivery({ func: 'add' });
  d.message.properties.headers = { huge: 'x'.repeat(70_000) };
  w.dispatcher.handle(d);
  await w.settled();
  await w.settled();
  assert.equal(published.length, 2, 'the copy, then the cleaned copy');
  assert.equal(published[1]?.['x-headers-dropped'], 1);
  assert.match(String(published[1]?.['x-error-message']), /could not be copied/);
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'ack' }]);
});

test('a message that keeps failing to settle is held, more each time, never a hot requeue loop', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const w = world(
    async () => ({ outcome: 'failed', error: { name: 'Error', message: 'nope' }, durationMs: 1 }),
    async () => {
      throw new Error('no broker');
    },
  );
  const body = { func: 'add', args: [9] };
  for (let i = 1; i <= 2; i++) {
    w.dispatcher.handle(delivery(body, { messageId: 'stuck' }));
    await w.settled();
    assert.equal(w.answers.length, i, 'the first two failures give it back at once');
  }
  w.dispatcher.handle(delivery(body, { messageId: 'stuck' }));
  await w.settled();
  assert.equal(w.answers.length, 2, 'the third is held');
  assert.equal(w.dispatcher.inFlight, 1);
  t.mock.timers.tick(1_000);
  assert.equal(w.answers.length, 3, 'and goes back after a second');
  assert.equal(w.dispatcher.inFlight, 0);
  w.dispatcher.handle(delivery(body, { messageId: 'stuck' }));
  await w.settled();
  t.mock.timers.tick(1_999);
  assert.equal(w.answers.length, 3, 'the fourth is held twice as long');
  const drained = w.dispatcher.drain();
  assert.equal(w.answers.length, 4, 'a drain gives it back at once');
  await drained;
});

test('a death with no delivery on the stack writes down every delivery running in a worker', async (t) => {
  const journal = tempJournal(t);
  const runs = heldRuns();
  const w = world(runs.run, undefined, { crashJournal: journal });
  const a = delivery({ func: 'add', args: [1] }, { messageId: 'a' });
  const b = delivery({ func: 'add', args: [2] }, { messageId: 'b' });
  w.dispatcher.handle(a);
  w.dispatcher.handle(b);
  // A worker's frame killed the master (say): neither delivery is on the stack.
  w.dispatcher.recordCrash();
  assert.equal(journal.deaths(crashKey('a', a.message.content)), 1);
  assert.equal(journal.deaths(crashKey('b', b.message.content)), 1);
});

test('acks the lost session never confirmed: their redeliveries are acked unrun, with an id or without', async () => {
  const w = world(async () => ok);
  const withId = delivery({ func: 'add', args: [1] }, { messageId: 'm1' });
  const noId = delivery({ func: 'add', args: [2] });
  w.dispatcher.handle(withId);
  w.dispatcher.handle(noId);
  await w.settled();
  assert.equal(w.requests.length, 2);
  const dead = liveSession;
  const fresh = w.loseChannel();
  w.dispatcher.sessionLost({
    session: dead,
    uncertain: [finishedMemo(withId.message), finishedMemo(noId.message)],
  });
  const again1 = delivery({ func: 'add', args: [1] }, { messageId: 'm1', redelivered: true, session: fresh });
  const again2 = delivery({ func: 'add', args: [2] }, { redelivered: true, session: fresh });
  w.dispatcher.handle(again1);
  w.dispatcher.handle(again2);
  await w.settled();
  assert.equal(w.requests.length, 2, 'neither ran again');
  assert.deepEqual(w.answers.slice(-2), [
    { tag: again1.message.fields.deliveryTag, how: 'ack' },
    { tag: again2.message.fields.deliveryTag, how: 'ack' },
  ]);
  // Each memory is taken once: a third copy of the same body runs.
  const third = delivery({ func: 'add', args: [2] }, { redelivered: true, session: fresh });
  w.dispatcher.handle(third);
  await w.settled();
  assert.equal(w.requests.length, 3);
});

test('without an id, a redelivery of a message still running is adopted by body: one run, settled once', async () => {
  const runs = heldRuns();
  const w = world(runs.run);
  const first = delivery({ func: 'add', args: [7] });
  w.dispatcher.handle(first);
  const fresh = w.loseChannel();
  w.dispatcher.sessionLost({ session: liveSession, uncertain: [] });
  const again = delivery({ func: 'add', args: [7] }, { redelivered: true, session: fresh });
  w.dispatcher.handle(again);
  assert.equal(w.requests.length, 1, 'adopted, not run again');
  runs.finish(ok);
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: again.message.fields.deliveryTag, how: 'ack' }]);
  assert.equal(w.dispatcher.inFlight, 0);
});
