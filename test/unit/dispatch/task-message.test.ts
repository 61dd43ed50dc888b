import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { depthExceeds, MAX_DEPTH, parseTaskMessage } from '../../../src/dispatch/task-message.ts';
import { stringifyExact } from '../../../src/ipc/exact-json.ts';

const callable = new Set(['add', 'echo']);
const parse = (body: unknown, max = 1024) =>
  parseTaskMessage(
    Buffer.isBuffer(body) ? body : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body)),
    callable,
    max,
  );

test('a valid message becomes a call; args default to [], empty kwargs are dropped', () => {
  assert.deepEqual(parse({ func: 'add', args: [1, 2] }), {
    ok: true,
    call: { func: 'add', args: [1, 2], kwargs: undefined, bigints: false },
  });
  assert.deepEqual(parse({ func: 'add' }), {
    ok: true,
    call: { func: 'add', args: [], kwargs: undefined, bigints: false },
  });
  assert.deepEqual(parse({ func: 'add', kwargs: {} }), {
    ok: true,
    call: { func: 'add', args: [], kwargs: undefined, bigints: false },
  });
  assert.deepEqual(parse({ func: 'echo', args: ['a'], kwargs: { k: 1 }, bigints: false }), {
    ok: true,
    call: { func: 'echo', args: ['a'], kwargs: { k: 1 }, bigints: false },
  });
});

test('every rejection README names, with its reason', () => {
  const cases: [unknown, RegExp][] = [
    ['{nope', /^body is not JSON/],
    [Buffer.from([0xff, 0x00]), /^body is not JSON/],
    [[1], /must be a JSON object, got an array/],
    ['null', /got null/],
    ['42', /got number/],
    ['"add"', /got string/],
    [{ args: [] }, /^func is missing$/],
    [{ func: 1 }, /^func must be a string$/],
    [{ func: 'nope' }, /^unknown func "nope"$/],
    [{ func: 'constructor' }, /unknown func/],
    [{ func: '__proto__' }, /unknown func/],
    [{ func: 'default' }, /unknown func/],
    [{ func: 'add.call' }, /unknown func/],
    [{ func: 'toString' }, /unknown func/],
    [{ func: 'hasOwnProperty' }, /unknown func/],
    [{ func: 'add', args: { 0: 1 } }, /^args must be an array$/],
    [{ func: 'add', args: 'x' }, /^args must be an array$/],
    [{ func: 'add', args: null }, /^args must be an array$/],
    [{ func: 'add', kwargs: [1] }, /^kwargs must be an object$/],
    [{ func: 'add', kwargs: null }, /^kwargs must be an object$/],
    [{ func: 'add', kwargs: 'x' }, /^kwargs must be an object$/],
    [{ func: 'add', args: ['x'.repeat(2000)] }, /over the limit of 1024/],
  ];
  for (const [body, reason] of cases) {
    const result = parse(body);
    assert.equal(result.ok, false, `${JSON.stringify(body)} is rejected`);
    if (!result.ok) assert.match(result.reason, reason);
  }
  const unknown = parse({ func: 'nope' });
  assert.equal(!unknown.ok && unknown.func, 'nope', 'the requested name is kept for the log');
});

test('property: any bytes give exactly one verdict and never throw', () => {
  fc.assert(
    fc.property(
      fc.oneof(
        fc.uint8Array({ maxLength: 200 }),
        fc.jsonValue().map((v) => new TextEncoder().encode(JSON.stringify(v) ?? '')),
      ),
      (bytes) => {
        const result = parseTaskMessage(Buffer.from(bytes), callable, 150);
        if (result.ok) assert.ok(callable.has(result.call.func) && Array.isArray(result.call.args));
        else assert.ok(result.reason.length > 0);
      },
    ),
  );
});

test('property: well-formed messages keep their func and args', () => {
  fc.assert(
    fc.property(fc.constantFrom('add', 'echo'), fc.array(fc.jsonValue(), { maxLength: 5 }), (func, args) => {
      const result = parseTaskMessage(Buffer.from(JSON.stringify({ func, args })), callable, 1 << 20);
      assert.ok(result.ok);
      assert.equal(result.call.func, func);
      // Exact: an integer JSON.parse would round comes back digit for digit.
      assert.equal(stringifyExact(result.call.args), JSON.stringify(args));
    }),
  );
});

test('a body that is not JSON is rejected with where, never with what it says', () => {
  const secret = 'hunter2-token-of-a-customer';
  const cases: [string, RegExp][] = [
    [`${secret} not json`, /^body is not JSON: unexpected character at byte 0$/],
    [`{"a":1,"${secret}"}`, /^body is not JSON: unexpected character at byte \d+$/],
    [`{"func":"add","args":[1,2]}} ${secret}`, /^body is not JSON: unexpected character at byte 27$/],
    [`{"k":"${secret}`, /^body is not JSON: it ends before the value does$/],
    ['   ', /^body is not JSON: it is empty$/],
  ];
  for (const [body, reason] of cases) {
    const parsed = parse(body);
    assert.equal(parsed.ok, false);
    if (parsed.ok) continue;
    assert.match(parsed.reason, reason, body);
    assert.ok(!parsed.reason.includes('hunter2'), `the reason quotes the body: ${parsed.reason}`);
  }
  // A multi-byte character before the culprit: the offset is in bytes, as the body is.
  const accented = parse('{"é": 1 x}');
  assert.equal(accented.ok || accented.reason, 'body is not JSON: unexpected character at byte 9');
});

test(`bodies nested deeper than ${MAX_DEPTH} levels are rejected, at any size under the limit`, () => {
  const nest = (depth: number) => '['.repeat(depth) + ']'.repeat(depth);
  // The 12 KB body: 5,000 levels inside args; it used to stop the master.
  const deep = parse(`{"func":"add","args":[${nest(5_000)},1]}`, 1024 * 1024);
  assert.deepEqual(deep, {
    ok: false,
    reason: `body is nested deeper than ${MAX_DEPTH} levels`,
    func: 'add',
  });
  // The object itself is level 1, args level 2: MAX_DEPTH levels in all are fine.
  const atLimit = parse(`{"func":"add","args":[${nest(MAX_DEPTH - 2)}]}`, 1024 * 1024);
  assert.equal(atLimit.ok, true);
  const over = parse(`{"func":"add","args":[${nest(MAX_DEPTH - 1)}]}`, 1024 * 1024);
  assert.equal(over.ok, false);
  // Deep objects count like deep arrays; width does not count.
  let obj = '1';
  for (let i = 0; i < 100; i++) obj = `{"k":${obj}}`;
  assert.equal(parse(`{"func":"add","kwargs":${obj}}`, 1024 * 1024).ok, false);
  const wide = JSON.stringify({ func: 'add', args: Array.from({ length: 10_000 }, (_, i) => [i]) });
  assert.equal(parse(wide, 1024 * 1024).ok, true);
});

test('depthExceeds walks without recursion, so no depth can overflow it', () => {
  let value: unknown = 0;
  for (let i = 0; i < 200_000; i++) value = [value];
  assert.equal(depthExceeds(value, 64), true);
  assert.equal(depthExceeds([[1], { a: [2] }], 3), false);
  assert.equal(depthExceeds([[1], { a: [2] }], 2), true);
});

test('integers past 2^53 are kept exactly; a number too large to hold is rejected with a reason', () => {
  const big = parse('{"func":"add","args":[12345678901234567890,1]}');
  assert.ok(big.ok);
  assert.deepEqual(big.call.args, [12345678901234567890n, 1]);
  assert.equal(big.call.bigints, true);
  const huge = parse('{"func":"add","args":[1e400]}');
  assert.deepEqual(huge, {
    ok: false,
    reason: 'a number in the body is too large to be held (past ±1.8e308)',
    func: undefined,
  });
});
