import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { AckBatch, type AckFrames } from '../../../src/amqp/ack-batch.ts';

/** The frames of a take, without the list of tags they cover (checked on its own below). */
const frames = ({ upTo, singles }: AckFrames) => ({ upTo, singles });

test('acks below every unsettled delivery go out as one multiple ack', () => {
  const batch = new AckBatch();
  for (let tag = 1; tag <= 5; tag++) batch.delivered(tag);
  batch.ack(2);
  batch.ack(1);
  batch.ack(3);
  assert.deepEqual(frames(batch.take()), { upTo: 3, singles: [] });
  assert.deepEqual(frames(batch.take()), { upTo: undefined, singles: [] }, 'nothing twice');
});

test('an ack above a delivery still running goes out alone, never covered by a multiple ack', () => {
  const batch = new AckBatch();
  for (let tag = 1; tag <= 5; tag++) batch.delivered(tag);
  batch.ack(1);
  batch.ack(4); // 2 and 3 still run
  assert.deepEqual(frames(batch.take()), { upTo: 1, singles: [4] });
  batch.ack(3);
  assert.deepEqual(frames(batch.take()), { upTo: undefined, singles: [3] }, '2 still runs');
  batch.ack(2);
  batch.ack(5);
  assert.deepEqual(frames(batch.take()), { upTo: 5, singles: [] });
});

test('a requeued delivery no longer holds back the multiple ack', () => {
  const batch = new AckBatch();
  for (let tag = 1; tag <= 3; tag++) batch.delivered(tag);
  batch.settled(1);
  batch.ack(2);
  batch.ack(3);
  assert.deepEqual(frames(batch.take()), { upTo: 3, singles: [] });
});

test('an ack of a tag not delivered on this channel is ignored', () => {
  const batch = new AckBatch();
  batch.delivered(1);
  batch.ack(7);
  assert.deepEqual(frames(batch.take()), { upTo: undefined, singles: [] });
});

test('property: the frames ack exactly the acked tags and never one still unsettled', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 40 }),
      fc.array(fc.tuple(fc.integer({ min: 1, max: 40 }), fc.constantFrom('ack', 'nack', 'take', 'hold')), {
        maxLength: 80,
      }),
      (n, ops) => {
        const batch = new AckBatch();
        for (let tag = 1; tag <= n; tag++) batch.delivered(tag);
        const unsettled = new Set(Array.from({ length: n }, (_, i) => i + 1));
        const brokerUnacked = new Set(unsettled); // what the broker holds for us
        const ackedByUs = new Set<number>();
        const apply = (holdBack = false) => {
          const { upTo, singles } = frames(batch.take({ holdBack }));
          if (upTo !== undefined) {
            for (const tag of [...brokerUnacked]) {
              if (tag <= upTo) {
                assert.ok(
                  ackedByUs.has(tag),
                  `multiple ack up to ${upTo} covers ${tag}, which was not acked`,
                );
                brokerUnacked.delete(tag);
              }
            }
          }
          for (const tag of singles) {
            assert.ok(brokerUnacked.has(tag), `single ack of ${tag} twice or unknown`);
            brokerUnacked.delete(tag);
          }
        };
        for (const [tag, op] of ops) {
          if (op === 'take') apply();
          else if (op === 'hold') apply(true);
          else if (tag <= n && unsettled.has(tag)) {
            unsettled.delete(tag);
            if (op === 'ack') {
              batch.ack(tag);
              ackedByUs.add(tag);
            } else {
              batch.settled(tag);
              brokerUnacked.delete(tag); // nack is sent at once
            }
          }
        }
        apply();
        assert.deepEqual(
          [...brokerUnacked].sort((a, b) => a - b),
          [...unsettled].sort((a, b) => a - b),
          'after the last take, the broker holds exactly the unsettled deliveries',
        );
      },
    ),
  );
});

test('holdBack keeps the acks above a running delivery for a later multiple ack to cover', () => {
  const batch = new AckBatch();
  for (let tag = 1; tag <= 6; tag++) batch.delivered(tag);
  batch.ack(1);
  batch.ack(4);
  batch.ack(5); // 2 and 3 still run
  assert.deepEqual(frames(batch.take({ holdBack: true })), { upTo: 1, singles: [] });
  assert.equal(batch.pending, 2, '4 and 5 wait');
  batch.ack(2);
  batch.ack(3);
  assert.deepEqual(
    frames(batch.take({ holdBack: true })),
    { upTo: 5, singles: [] },
    'one frame covers 2 to 5',
  );
  assert.equal(batch.pending, 0);
  batch.ack(6);
  assert.deepEqual(frames(batch.take({ holdBack: true })), { upTo: 6, singles: [] });
});

test('without holdBack, the acks held back go out alone: a long task below them does not hold them', () => {
  const batch = new AckBatch();
  for (let tag = 1; tag <= 3; tag++) batch.delivered(tag);
  batch.ack(2);
  batch.ack(3);
  assert.deepEqual(frames(batch.take({ holdBack: true })), { upTo: undefined, singles: [] });
  assert.deepEqual(frames(batch.take()), { upTo: undefined, singles: [2, 3] });
  assert.equal(batch.pending, 0);
});

test('lowestUnsettled names the delivery that holds the acks above it back', () => {
  const batch = new AckBatch();
  assert.equal(batch.lowestUnsettled, undefined);
  for (let tag = 1; tag <= 3; tag++) batch.delivered(tag);
  batch.ack(1);
  assert.equal(batch.lowestUnsettled, 2);
  batch.settled(2);
  assert.equal(batch.lowestUnsettled, 3);
});

test('a take says every tag its frames ack, and none it holds back', () => {
  const batch = new AckBatch();
  for (const tag of [1, 2, 3, 4]) batch.delivered(tag);
  batch.ack(1);
  batch.ack(3);
  batch.ack(4);
  assert.deepEqual(batch.take({ holdBack: true }).sent, [1]);
  assert.deepEqual(batch.take().sent, [3, 4]);
});
