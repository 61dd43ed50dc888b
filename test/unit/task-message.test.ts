import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { parseTaskMessage } from '../../src/task-message.ts';

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
    call: { func: 'add', args: [1, 2], kwargs: undefined },
  });
  assert.deepEqual(parse({ func: 'add' }), { ok: true, call: { func: 'add', args: [], kwargs: undefined } });
  assert.deepEqual(parse({ func: 'add', kwargs: {} }), {
    ok: true,
    call: { func: 'add', args: [], kwargs: undefined },
  });
  assert.deepEqual(parse({ func: 'echo', args: ['a'], kwargs: { k: 1 } }), {
    ok: true,
    call: { func: 'echo', args: ['a'], kwargs: { k: 1 } },
  });
});

test('every rejection of SPEC §2, with its reason', () => {
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
      assert.deepEqual(result.call.args, JSON.parse(JSON.stringify(args)));
    }),
  );
});
