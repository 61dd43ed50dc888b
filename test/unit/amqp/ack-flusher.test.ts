// When a session's acks go out, against a fake channel that records the frames.
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import type { Channel } from 'amqplib';
import { AckFlusher } from '../../../src/amqp/ack-flusher.ts';

function channel() {
  const frames: [tag: number, multiple: boolean][] = [];
  const ch = {
    ack: (m: { fields: { deliveryTag: number } }, multiple: boolean) =>
      frames.push([m.fields.deliveryTag, multiple]),
  } as unknown as Channel;
  return { ch, frames };
}

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));
const later = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** The timer as Node has it, kept before any test counts the calls to setTimeout. */
const realSetTimeout = globalThis.setTimeout;
/**
 * Waits until `done()`, within a generous ceiling: timers only ever fire late on a busy
 * machine, so no test waits a fixed time for what a timer does. It polls on the real
 * timer, so a test that counts the flusher's timers does not count its own.
 */
async function until(what: string, done: () => boolean): Promise<void> {
  const ceiling = performance.now() + 20_000;
  while (!done()) {
    assert.ok(performance.now() < ceiling, `${what} within 20 s`);
    await new Promise<void>((resolve) => realSetTimeout(resolve, 5));
  }
}

/**
 * Mocked timers and a performance.now() that moves with them: the flusher reads the
 * clock, so one clock decides. Returns the way to move both.
 */
function mockedClock(t: TestContext): (ms: number) => void {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  let clock = 1_000;
  t.mock.method(performance, 'now', () => clock);
  return (ms) => {
    clock += ms;
    t.mock.timers.tick(ms);
  };
}

/**
 * The delays of the timers armed from now until the test ends, through whatever
 * setTimeout is in place (Node's, or the mocked one): every timer that fires wakes the
 * master.
 */
function timersArmed(t: TestContext): (number | undefined)[] {
  const delays: (number | undefined)[] = [];
  const before = globalThis.setTimeout;
  globalThis.setTimeout = ((fn: () => void, ms?: number) => {
    delays.push(ms);
    return before(fn, ms);
  }) as typeof setTimeout;
  t.after(() => {
    globalThis.setTimeout = before;
  });
  return delays;
}

test('acks reaching the threshold go out at the end of the turn as one multiple ack', async () => {
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 3);
  for (const tag of [1, 2, 3]) f.delivered(tag);
  for (const tag of [1, 2, 3]) f.ack(tag);
  await turn();
  assert.deepEqual(frames, [[3, true]]);
  assert.equal(f.pending, 0);
});

test('below the threshold they go out within a few ms; one above a running task waits, then goes alone', async () => {
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 100);
  for (const tag of [1, 2, 3]) f.delivered(tag);
  f.ack(1);
  f.ack(3); // 2 still runs
  await later(3);
  assert.deepEqual(frames, [[1, true]], 'the multiple ack goes; 3 is held behind 2');
  await until('the held ack, once its 5 ms hold is over', () => frames.length === 2);
  assert.deepEqual(frames, [
    [1, true],
    [3, false],
  ]);
});

test('an ack held above a running task wakes the flusher when its hold ends, not every millisecond', async (t) => {
  // Every timer that fires wakes the master; count the flusher's.
  const timers = timersArmed(t);
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 100);
  for (const tag of [1, 2]) f.delivered(tag);
  f.ack(2); // 1 still runs
  await until('the held ack', () => frames.length > 0);
  assert.deepEqual(frames, [[2, false]], 'it went alone once its hold was over');
  // One to see it held and one for the end of the hold, and up to two more if those
  // fired a little early: Node counts a timer from the event loop's cached clock, which
  // on a busy machine can be a millisecond or more behind. Polling every millisecond
  // armed one per millisecond of the 5 ms hold, six or so.
  assert.ok(timers.length <= 4, `${timers.length} timers for one held ack`);
});

test('an ack that frees what was held brings the flush forward', async () => {
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 100);
  for (const tag of [1, 2]) f.delivered(tag);
  f.ack(2);
  await later(2); // seen held: the next look is at the end of the hold
  f.ack(1);
  await later(3);
  assert.deepEqual(frames, [[2, true]], 'one multiple ack, before the hold would have ended');
});

test('a settle that frees what was held brings the flush forward', async () => {
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 100);
  for (const tag of [1, 2]) f.delivered(tag);
  f.ack(2);
  await later(2);
  f.settled(1);
  await later(3);
  assert.deepEqual(frames, [[2, true]]);
});

test('a nack or reject (settled) no longer holds back a multiple ack', async () => {
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 2);
  for (const tag of [1, 2, 3]) f.delivered(tag);
  f.settled(1);
  f.ack(2);
  f.ack(3);
  await turn();
  assert.deepEqual(frames, [[3, true]]);
});

test('once stopped (its channel gone) nothing is sent and no timer is left', async () => {
  const { ch, frames } = channel();
  const f = new AckFlusher(ch, 100);
  f.delivered(1);
  f.ack(1);
  f.stop();
  f.ack(1);
  f.flush();
  await later(10);
  assert.deepEqual(frames, []);
});

test('a channel that refuses the write (its connection closing) stops the flusher: no throw from the timer', async () => {
  let tries = 0;
  const ch = {
    ack: () => {
      tries++;
      // What amqplib throws on a channel whose connection has begun to close.
      throw Object.assign(new Error('Connection closing'), { name: 'IllegalOperationError' });
    },
  } as unknown as Channel;
  const f = new AckFlusher(ch, 100);
  for (const tag of [1, 2]) f.delivered(tag);
  f.ack(1);
  // The timed flush throws inside amqplib; a throw out of the timer would fail this test.
  await later(10);
  assert.equal(tries, 1);
  f.ack(2);
  f.flush();
  await later(10);
  assert.equal(tries, 1, 'stopped: nothing more is written');
});

test('fences: acks written are confirmed when a fence after them is answered; one fence at a time', async () => {
  const { ch, frames } = channel();
  const fences: (() => void)[] = [];
  const confirmed: number[][] = [];
  const f = new AckFlusher(ch, 1, {
    run: () => new Promise<void>((resolve) => fences.push(resolve)),
    onConfirmed: (tags) => confirmed.push(tags),
    onUnanswered: () => assert.fail('no fence was late'),
  });
  for (const tag of [1, 2, 3]) f.delivered(tag);
  f.ack(1);
  await turn();
  await later(40);
  assert.equal(fences.length, 1, 'a fence after the acks went out');
  f.ack(2);
  f.ack(3);
  await turn();
  await later(40);
  assert.equal(fences.length, 1, 'the next waits for the answer');
  fences[0]?.();
  await later(40);
  assert.deepEqual(confirmed, [[1]]);
  assert.equal(fences.length, 2, 'and then covers what came meanwhile');
  fences[1]?.();
  await later(1);
  assert.deepEqual(confirmed, [[1], [2, 3]]);
  assert.deepEqual(frames, [
    [1, true],
    [3, true],
  ]);
  f.stop();
});

test('a few acks wait 25 ms for their fence; once 32 wait, it goes 5 ms after the first', async (t) => {
  const advance = mockedClock(t);
  const { ch } = channel();
  let sent = 0;
  // Fences never answered, so each flusher sends one at most: one flusher per rule.
  const flusher = () => {
    const f = new AckFlusher(ch, 1_000, {
      run: () => {
        sent++;
        return new Promise<void>(() => {});
      },
      onConfirmed: () => {},
      onUnanswered: () => {},
    });
    t.after(() => f.stop());
    for (let tag = 1; tag <= 40; tag++) f.delivered(tag);
    return f;
  };
  const few = flusher();
  few.ack(1);
  few.ack(2);
  advance(1); // written within ACK_DELAY_MS: the fence counts from here
  advance(24);
  assert.equal(sent, 0, 'two acks: no fence 24 ms after they were written');
  advance(1);
  assert.equal(sent, 1, 'but one 25 ms after');

  const many = flusher();
  many.ack(1);
  advance(1); // the first ack written: the fence counts from here
  advance(2);
  for (let tag = 2; tag <= 33; tag++) many.ack(tag);
  advance(1); // 32 more written, 3 ms after the first
  advance(1);
  assert.equal(sent, 1, 'not 4 ms after the first was written');
  advance(1);
  assert.equal(sent, 2, '33 acks: the fence went 5 ms after the first, not 5 after the batch filled');
});

test('while tasks wait for a worker, acks wait 20 ms and go out with their fence; once none wait, within 1 ms', async (t) => {
  const advance = mockedClock(t);
  // The timers the flusher arms: a fence sent in the acks' own turn arms none of its own.
  const delays = timersArmed(t);
  const { ch, frames } = channel();
  let fences = 0;
  let waiting = true;
  const f = new AckFlusher(
    ch,
    1_000,
    {
      run: () => {
        fences++;
        return new Promise<void>(() => {});
      },
      onConfirmed: () => {},
      onUnanswered: () => {},
    },
    (workMs) => {
      assert.equal(workMs, 40, 'asked for the wait and the refill after it');
      return waiting;
    },
  );
  t.after(() => f.stop());
  for (let tag = 1; tag <= 10; tag++) f.delivered(tag);
  f.ack(1);
  advance(5);
  f.ack(3); // 2 still runs
  advance(14);
  assert.deepEqual(frames, [], 'nothing 19 ms after the first ack');
  assert.equal(fences, 0);
  advance(1);
  assert.deepEqual(
    frames,
    [
      [1, true],
      [3, false],
    ],
    '20 ms after the first: the multiple ack, and the one above a running task not held further',
  );
  assert.equal(fences, 1, 'and their fence at once, not 25 ms later');
  assert.deepEqual(delays, [20, 3_000], 'the wait and the fence deadline: no timer for the fence itself');

  // No task waits for a worker any more: the next ack is not held 20 ms, and it brings
  // forward a wait already armed.
  f.ack(2);
  waiting = false;
  f.ack(4);
  advance(1);
  assert.deepEqual(frames.slice(2), [[4, true]]);
  assert.equal(fences, 1, 'acks within 1 ms take the usual fence rule (one in flight here)');
});

test('a fence not answered by its deadline says the link is dead', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setImmediate'] });
  const { ch } = channel();
  let unanswered = 0;
  const f = new AckFlusher(ch, 1, {
    run: () => new Promise<void>(() => {}),
    onConfirmed: () => assert.fail('nothing was confirmed'),
    onUnanswered: () => unanswered++,
  });
  f.delivered(1);
  f.ack(1);
  t.mock.timers.tick(1);
  // A lone ack's fence goes 25 ms after it (FENCE_WITHIN_MS); its deadline from then.
  t.mock.timers.tick(25);
  t.mock.timers.tick(2_999);
  assert.equal(unanswered, 0);
  t.mock.timers.tick(1);
  assert.equal(unanswered, 1);
  f.stop();
});

test('with no ack going out, a fence is still sent every 2 s: a silent link is noticed in a lull too', async (t) => {
  const { ch } = channel();
  let sent = 0;
  let sentAt = 0;
  let unanswered = 0;
  let unansweredAt = 0;
  // Before the flusher exists, so that its 2 s of quiet are counted from after this.
  const started = performance.now();
  const f = new AckFlusher(ch, 1, {
    run: () => {
      sent++;
      sentAt = performance.now();
      return new Promise<void>(() => {});
    },
    onConfirmed: () => {},
    onUnanswered: () => {
      unanswered++;
      unansweredAt = performance.now();
    },
  });
  t.after(() => f.stop());
  // Judged by the times the flusher acted at, not the moments `until` noticed.
  await until('a probe fence', () => sent === 1);
  assert.ok(sentAt - started >= 2_000, 'the probe came after 2 s of quiet, not before');
  await until('its deadline', () => unanswered === 1);
  // 3 s, less what Node's cached clock may lag behind when the deadline's timer is armed.
  assert.ok(unansweredAt - sentAt >= 2_900, 'unanswered only past its 3 s deadline');
  assert.equal(sent, 1, 'one fence at a time');
});
