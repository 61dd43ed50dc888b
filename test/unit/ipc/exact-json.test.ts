// Integers past 2^53 stay exact from the body to the task and back into the reply.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { parseExact, stringifyExact } from '../../../src/ipc/exact-json.ts';

test('an integer past 2^53 becomes a BigInt and is written back digit for digit', () => {
  const text = '{"func":"f","args":[12345678901234567890,-98765432109876543210,1.5,3,9007199254740991]}';
  const parsed = parseExact(text);
  assert.ok(parsed.ok);
  assert.equal(parsed.bigints, true);
  const args = (parsed.value as { args: unknown[] }).args;
  assert.deepEqual(args, [12345678901234567890n, -98765432109876543210n, 1.5, 3, 9007199254740991]);
  assert.equal(stringifyExact(parsed.value), text);
});

test('a plain body takes the fast path, and a number too large to hold is refused, never null', () => {
  const plain = parseExact('{"a":[1,2,3.25]}');
  assert.deepEqual(plain, { ok: true, value: { a: [1, 2, 3.25] }, bigints: false });
  const huge = parseExact('{"args":[1e400]}');
  assert.equal(huge.ok, false);
  assert.match(huge.ok ? '' : huge.reason, /too large to be held/);
  // A long run of digits inside a string is not a number.
  assert.deepEqual(parseExact('{"s":"12345678901234567890"}'), {
    ok: true,
    value: { s: '12345678901234567890' },
    bigints: false,
  });
});

test('any integer survives parse and stringify exactly', () => {
  fc.assert(
    fc.property(fc.bigInt({ min: -(2n ** 200n), max: 2n ** 200n }), (n) => {
      const parsed = parseExact(`[${n}]`);
      assert.ok(parsed.ok);
      const [value] = parsed.value as [bigint | number];
      assert.equal(BigInt(value), n);
      assert.equal(stringifyExact(parsed.value), `[${n}]`);
    }),
  );
});
