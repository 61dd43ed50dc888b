// When a delayed message may run, and which delay queue it takes next: a message never
// runs early, and any wait is a few steps of the ladder.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DELAY_STEPS_MS, delayStep, MAX_DELAY_MS } from '../../../src/amqp/delay.ts';
import { delayOf } from '../../../src/dispatch/delay-header.ts';

test('x-delay counts from arrival; x-delay-until, once stamped, decides; a bad one is a reason', () => {
  const now = 1_000_000;
  assert.equal(delayOf({}, now), undefined);
  assert.equal(delayOf({ 'x-delay': 3000 }, now), now + 3000);
  assert.equal(delayOf({ 'x-delay': '3000' }, now), now + 3000, 'as text too');
  assert.equal(delayOf({ 'x-delay': 0 }, now), undefined, 'the plugin treats 0 as none');
  assert.equal(delayOf({ 'x-delay': -5 }, now), undefined);
  assert.equal(delayOf({ 'x-delay': 3000, 'x-delay-until': now - 1 }, now), undefined, 'its time has come');
  assert.equal(delayOf({ 'x-delay': 3000, 'x-delay-until': now + 10 }, now), now + 10);
  assert.match(String(delayOf({ 'x-delay': 'soon' }, now)), /x-delay must be a number of milliseconds/);
  assert.match(String(delayOf({ 'x-delay': MAX_DELAY_MS + 1 }, now)), /x-delay must be/);
  assert.match(String(delayOf({ 'x-delay-until': 'later' }, now)), /x-delay-until is not a time/);
  assert.match(String(delayOf({ 'x-delay-until': now + MAX_DELAY_MS + 1 }, now)), /more than/);
  // An inherited header is not the message's (see ownHeader).
  assert.equal(delayOf(Object.create({ 'x-delay': 5000 }), now), undefined);
});

test('property: the ladder never passes a wait, and ends any wait in a few steps per power of four', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: MAX_DELAY_MS }), (wait) => {
      let remaining = wait;
      let steps = 0;
      while (remaining > 0) {
        const step = delayStep(remaining);
        // Only a wait shorter than the first step is passed, by less than that step.
        if (step > remaining && step !== DELAY_STEPS_MS[0]) return false;
        remaining -= step;
        steps++;
      }
      const longest = DELAY_STEPS_MS.at(-1) as number;
      return steps <= 3 * DELAY_STEPS_MS.length + Math.ceil(wait / longest);
    }),
  );
});
