// The dispatcher's settlement and dedupe paths, with a fake consumer, pool and publisher:
// every delivery gets exactly one answer (ack, or requeue counted or not), whatever
// fails on the way, and the dedupe memory never acks a message that did not run.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { Channel, ConsumeMessage } from 'amqplib';
import pino from 'pino';
import { Registry } from 'prom-client';
import type { Delivery } from '../../src/amqp-consumer.ts';
import { CrashJournal, crashKey } from '../../src/crash-journal.ts';
import { Dispatcher, type DispatcherOptions } from '../../src/dispatcher.ts';
import { createMetrics } from '../../src/metrics.ts';
import type { TaskRequest, TaskResult } from '../../src/pool.ts';

let nextTag = 1;
const liveChannel = {} as Channel;

function delivery(
  body: unknown,
  opts: { messageId?: string; redelivered?: boolean; attempts?: number; channel?: Channel } = {},
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
  return { message, channel: opts.channel ?? liveChannel };
}

type Answer = { tag: number; how: 'ack' | 'requeue' | 'reject' };

/** A world of fakes; `run` decides what each task does, `publish` what each publish does. */
function world(
  run: (request: TaskRequest) => Promise<TaskResult>,
  publish: () => Promise<void> = async () => {},
  overrides: Partial<DispatcherOptions> = {},
) {
  const answers: Answer[] = [];
  const requests: TaskRequest[] = [];
  let live = liveChannel;
  const consumer = {
    isLive: (d: Delivery) => d.channel === live,
    ack(d: Delivery) {
      if (d.channel !== live) return false;
      answers.push({ tag: d.message.fields.deliveryTag, how: 'ack' });
      return true;
    },
    requeue(d: Delivery, counted = false) {
      if (d.channel !== live) return false;
      answers.push({ tag: d.message.fields.deliveryTag, how: counted ? 'reject' : 'requeue' });
      return true;
    },
  };
  const metrics = createMetrics(new Registry(), { defaultMetrics: false });
  const dispatcher = new Dispatcher({
    pool: {
      funcs: new Set(['add']),
      run: (request: TaskRequest) => {
        requests.push(request);
        return run(request);
      },
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
    /** The channel dies: its deliveries can no longer be settled. */
    loseChannel: () => {
      live = {} as Channel;
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
  let last: (r: TaskResult) => void = () => {};
  return {
    run: () =>
      new Promise<TaskResult>((resolve) => {
        last = resolve;
      }),
    finish: (r: TaskResult) => last(r),
  };
}

const ok: TaskResult = { outcome: 'succeeded', resultJson: undefined, durationMs: 1 };
const crashed: TaskResult = {
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
    async () => ({ outcome: 'failed', error: undefined, durationMs: 1 }) as unknown as TaskResult,
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
  const again = delivery({ func: 'add' }, { messageId: 'm1', redelivered: true, channel: newChannel });
  w2.dispatcher.handle(again);
  assert.deepEqual(w2.answers, [{ tag: again.message.fields.deliveryTag, how: 'ack' }]);
  assert.equal(w2.requests.length, 1);
  // A retry copy keeps the message id but is another attempt: it runs.
  const retry = delivery(
    { func: 'add' },
    { messageId: 'm1', redelivered: true, attempts: 1, channel: newChannel },
  );
  w2.dispatcher.handle(retry);
  assert.equal(w2.requests.length, 2);
});

test('the dedupe memory expires: a message id seen long ago runs again', async () => {
  let now = 0;
  // A memory whose clock we drive.
  const { RecentIds } = await import('../../src/recent-ids.ts');
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
  w0.dispatcher.handle(delivery({ func: 'add' }, { messageId: 'm2', redelivered: true, channel: ch }));
  assert.equal(w0.requests.length, 2, 'forgotten: it runs');
});

test('a redelivery of a message still running is not run again, and the run settles the new delivery', async () => {
  const held = heldRuns();
  const finish = held.finish;
  const w = world(held.run);
  w.dispatcher.handle(delivery({ func: 'add' }, { messageId: 'm3' }));
  const ch = w.loseChannel();
  const again = delivery({ func: 'add' }, { messageId: 'm3', redelivered: true, channel: ch });
  w.dispatcher.handle(again);
  assert.equal(w.requests.length, 1);
  // The running request is no longer abandoned: its message's live delivery took over.
  assert.equal(w.requests[0]?.abandoned?.(), false);
  finish(ok);
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: again.message.fields.deliveryTag, how: 'ack' }]);
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
  const { UnroutableError } = await import('../../src/amqp-publisher.ts');
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

test('the last resort writes down the delivery being handled, and only then', async (t) => {
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
  // Outside of handling, nothing is on the stack.
  w.dispatcher.recordCrash();
  assert.equal(journal.deaths(crashKey('boom', d.message.content)), 1);
  // And the throw ended that delivery alone: dead-lettered as crashed, then acked.
  await w.settled();
  assert.deepEqual(w.answers, [{ tag: d.message.fields.deliveryTag, how: 'ack' }]);
  assert.equal(w.dispatcher.inFlight, 0);
});
