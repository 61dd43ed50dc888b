// Whatever a task throws becomes a plain error whose every field is a string, without a
// throw of its own: the settlement path reads these fields for every failed task.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { serializeError } from '../../src/errors.ts';

function assertPlain(e: ReturnType<typeof serializeError>): void {
  assert.equal(typeof e.name, 'string');
  assert.equal(typeof e.message, 'string');
  if (e.stack !== undefined) assert.equal(typeof e.stack, 'string');
  if (e.code !== undefined) assert.equal(typeof e.code, 'string');
  // It must cross IPC as JSON.
  assert.deepEqual(JSON.parse(JSON.stringify(e)), e);
}

test('odd throws: an Error without a string message, throwing getters, cycles, symbols, BigInt', () => {
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  const getterThrows = new Error('x');
  Object.defineProperty(getterThrows, 'message', {
    get() {
      throw new Error('boom');
    },
  });
  const objectMessage = new Error();
  (objectMessage as { message: unknown }).message = { detail: 1 };
  const noMessage = new Error();
  (noMessage as { message: unknown }).message = undefined;
  const stackThrows = new Error('s');
  Object.defineProperty(stackThrows, 'stack', {
    get() {
      throw new Error('no stack');
    },
  });
  const numericCode = Object.assign(new Error('c'), { code: 42 });
  const hostile = {
    toString() {
      throw new Error('no');
    },
    toJSON() {
      throw new Error('no');
    },
  };
  const cases: [unknown, string | RegExp][] = [
    [undefined, 'undefined'],
    [null, 'null'],
    ['plain', 'plain'],
    [cyclic, '[object Object]'],
    [getterThrows, '(an error without a message)'],
    [objectMessage, '{"detail":1}'],
    [noMessage, '(an error without a message)'],
    [stackThrows, 's'],
    [Symbol('q'), 'Symbol(q)'],
    [10n, '10'],
    [hostile, '[object Object]'],
    ['x'.repeat(100_000), /^x{4000}…$/],
  ];
  for (const [thrown, message] of cases) {
    const e = serializeError(thrown);
    assertPlain(e);
    if (typeof message === 'string') assert.equal(e.message, message);
    else assert.match(e.message, message);
  }
  assert.equal(serializeError(numericCode).code, '42');
});

test('property: anything thrown serialises to plain strings', () => {
  fc.assert(
    fc.property(
      fc.anything({ withBigInt: true, withMap: true, withSet: true, withNullPrototype: true }),
      (value) => {
        assertPlain(serializeError(value));
        const err = new Error('m');
        (err as { message: unknown }).message = value;
        assertPlain(serializeError(err));
      },
    ),
  );
});
