// What a worker may send the master, and what it may not: every malformed frame and
// result line is named, never trusted.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { checkChildMessage, resultLineProblem } from '../../../src/ipc/validate.ts';

test('the frames of the protocol pass, as copies of their known fields', () => {
  assert.deepEqual(checkChildMessage({ type: 'ready', funcs: ['a', 'b'] }), {
    ok: true,
    value: { type: 'ready', funcs: ['a', 'b'], limits: {} },
  });
  assert.deepEqual(checkChildMessage({ type: 'cancelled', taskIds: [1, 2] }), {
    ok: true,
    value: { type: 'cancelled', taskIds: [1, 2] },
  });
  const failed = checkChildMessage({ type: 'load-failed', error: { name: 'Error', message: 'x', extra: 1 } });
  assert.deepEqual(failed, {
    ok: true,
    value: { type: 'load-failed', error: { name: 'Error', message: 'x' } },
  });
});

test('malformed frames are named: null, no type, unknown type, wrong shapes', () => {
  const cases: [unknown, RegExp][] = [
    [null, /not an object \(null\)/],
    [5, /not an object \(number\)/],
    [[1], /not an object \(an array\)/],
    [{}, /without a type/],
    [{ type: 'run' }, /unknown type/],
    [{ type: 'ready', funcs: 3 }, /funcs is not an array/],
    [{ type: 'ready', funcs: [1] }, /funcs is not an array of names/],
    [{ type: 'cancelled', taskIds: 5 }, /taskIds is not an array/],
    [{ type: 'cancelled', taskIds: [0] }, /taskIds is not an array of task ids/],
    [{ type: 'load-failed', error: null }, /without an error/],
    [{ type: 'load-failed', error: { name: 1, message: 'x' } }, /without an error/],
  ];
  for (const [frame, problem] of cases) {
    const checked = checkChildMessage(frame);
    assert.equal(checked.ok, false, JSON.stringify(frame));
    assert.match(checked.ok ? '' : checked.problem, problem, JSON.stringify(frame));
  }
});

test("result lines: the runner's pass; forged or broken ones are named", () => {
  assert.equal(
    resultLineProblem({ taskId: 3, ok: true, resultJson: '1', ranMs: 0.2, rssBytes: 100 }),
    undefined,
  );
  assert.equal(resultLineProblem({ taskId: 3, ok: true }), undefined);
  assert.equal(
    resultLineProblem({ taskId: 3, ok: false, error: { name: 'E', message: 'm', code: 'C' } }),
    undefined,
  );
  const bad: [unknown, RegExp][] = [
    [null, /not an object/],
    [{ ok: true }, /without a task id/],
    [{ taskId: 1.5, ok: true }, /without a task id/],
    [{ taskId: 1, ok: false, error: null }, /failed result line without an error/],
    [{ taskId: 1, ok: 'yes' }, /ok is not true or false/],
    [{ taskId: 1, ok: true, resultJson: 5 }, /resultJson is not text/],
    [{ taskId: 1, ok: true, ranMs: -1 }, /ranMs/],
    [{ taskId: 1, ok: true, rssBytes: 'big' }, /rssBytes/],
    [{ taskId: 1, ok: false, error: { name: 'E', message: 'm', stack: 4 } }, /without an error/],
  ];
  for (const [line, problem] of bad)
    assert.match(resultLineProblem(line) ?? '', problem, JSON.stringify(line));
});

test('no value of any shape makes the checks throw', () => {
  fc.assert(
    fc.property(fc.anything(), (value) => {
      checkChildMessage(value);
      resultLineProblem(value);
      checkChildMessage({ type: 'ready', funcs: value });
      resultLineProblem({ taskId: 1, ok: false, error: value });
    }),
  );
});

test('a ready frame carries checked limits, only for functions it names', () => {
  const checked = checkChildMessage({
    type: 'ready',
    funcs: ['resize'],
    limits: { resize: { timeoutMs: 1000, concurrency: 2, rate: { count: 5, perMs: 1000 } } },
  });
  assert.ok(checked.ok);
  assert.deepEqual(
    { ...(checked.value as { limits: object }).limits },
    {
      resize: { timeoutMs: 1000, concurrency: 2, rate: { count: 5, perMs: 1000 } },
    },
  );
  const cases: [unknown, RegExp][] = [
    [{ type: 'ready', funcs: ['a'], limits: 5 }, /limits is not an object/],
    [{ type: 'ready', funcs: ['a'], limits: { b: {} } }, /limits for a function it does not name/],
    [{ type: 'ready', funcs: ['a'], limits: { a: { timeoutMs: -1 } } }, /out of their bounds/],
    [{ type: 'ready', funcs: ['a'], limits: { a: { concurrency: 0 } } }, /out of their bounds/],
    [{ type: 'ready', funcs: ['a'], limits: { a: { rate: { count: 5, perMs: 7 } } } }, /out of their bounds/],
    [{ type: 'ready', funcs: ['a'], limits: { a: null } }, /not an object/],
  ];
  for (const [frame, problem] of cases) {
    const result = checkChildMessage(frame);
    assert.equal(result.ok, false);
    assert.match((result as { problem: string }).problem, problem);
  }
});
