// Whatever a task throws becomes a plain error whose every field is a string, without a
// throw of its own: the settlement path reads these fields for every failed task.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  DeadlineError,
  ERROR_CODES,
  exitCodeFor,
  ServiceError,
  serializeError,
  taskFailure,
} from '../../src/errors.ts';
import { createLogger } from '../../src/util/logger.ts';

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

test("every error code is in README's table, with its meaning, and the table names no other", () => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const section = readme.slice(
    readme.indexOf('## Error codes'),
    readme.indexOf('## Coming from the Python tool'),
  );
  const rows = new Map(
    [...section.matchAll(/^\| `(ERR_[A-Z_]+)` \| (.+) \|$/gm)].map((m) => [m[1] as string, m[2] as string]),
  );
  for (const [code, meaning] of Object.entries(ERROR_CODES)) {
    assert.equal(
      rows.get(code),
      meaning.replaceAll('|', '\\|'),
      `${code} is missing from README's error codes, or says otherwise`,
    );
  }
  assert.deepEqual([...rows.keys()].sort(), Object.keys(ERROR_CODES).sort());
});

test('every code a source file names is in the registry', () => {
  const known = new Set(Object.keys(ERROR_CODES));
  const root = new URL('../../src/', import.meta.url);
  for (const file of readdirSync(root, { recursive: true, encoding: 'utf8' })) {
    if (!file.endsWith('.ts')) continue;
    const text = readFileSync(new URL(file, root), 'utf8');
    for (const [, code] of text.matchAll(/['"](ERR_[A-Z_]+)['"]/g))
      assert.ok(known.has(code as string), `${file}: ${code} is not in src/errors.ts`);
  }
});

test('the synthetic task failures are named and coded alike', () => {
  const made = [
    taskFailure.timeout(1500, false),
    taskFailure.timeout(1500, true),
    taskFailure.crashed('SIGKILL'),
    taskFailure.protocol('a frame that is not an object'),
    taskFailure.dispatch('handing it over failed', { name: 'Error', message: 'boom' }),
    taskFailure.crashLoop(3),
  ];
  for (const e of made) {
    assert.match(e.name, /Error$/);
    assert.ok(e.code !== undefined && e.code in ERROR_CODES, e.code);
    assertPlain(e);
  }
  assert.match(made[0]?.message ?? '', /time limit of 1.5 s/);
});

test('exit codes: 2 for what cannot run as asked, 1 for the rest', () => {
  assert.equal(exitCodeFor(new ServiceError('ERR_CONFIG', 'x')), 2);
  assert.equal(exitCodeFor(new ServiceError('ERR_TOPOLOGY', 'x')), 2);
  assert.equal(exitCodeFor(new ServiceError('ERR_TASK_MODULE', 'x')), 2);
  assert.equal(exitCodeFor(new ServiceError('ERR_WORKER_BOOT', 'x')), 1);
  assert.equal(exitCodeFor(new Error('x')), 1);
});

test('a plain object thrown by a library logs with its message, not as "Object" with none', () => {
  const lines: string[] = [];
  const log = createLogger('info', { write: (line: string) => lines.push(line) });
  log.warn(
    { err: { message: 'Handshake terminated by server: 403 (ACCESS-REFUSED)', code: 403 } },
    'refused',
  );
  log.warn({ err: new DeadlineError('connecting', 2000) }, 'late');
  const [refused, late] = lines.map((l) => JSON.parse(l));
  assert.equal(refused.err.message, 'Handshake terminated by server: 403 (ACCESS-REFUSED)');
  assert.equal(refused.err.code, '403');
  assert.equal(late.err.type, 'DeadlineError');
  assert.equal(late.err.code, 'ERR_DEADLINE');
});
