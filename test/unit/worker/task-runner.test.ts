// The child's task runner, in process: its IPC and its results pipe are plain functions
// here, so its order, its reports and its answers to the master can be watched directly.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ChildMessage, ResultLine, RunTask } from '../../../src/ipc/protocol.ts';
import { Job, type TaskRequest } from '../../../src/pool/job.ts';
import { currentTask } from '../../../src/worker/task-context.ts';
import type { TaskFunction } from '../../../src/worker/task-module.ts';
import { TaskRunner } from '../../../src/worker/task-runner.ts';
import { taskRequest } from '../../support/task-request.ts';

function runner(funcs: Record<string, TaskFunction>, rss?: () => number) {
  const sent: ChildMessage[] = [];
  const results: ResultLine[] = [];
  const r = new TaskRunner({
    funcs: new Map(Object.entries(funcs)),
    send: (m) => sent.push(m),
    writeResult: (line) => results.push(line),
    ...(rss === undefined ? {} : { rss }),
  });
  return { r, sent, results };
}

let nextId = 1;
function task(func: string, args: unknown[] = [], more: Partial<RunTask> = {}): RunTask {
  return {
    taskId: nextId++,
    func,
    args,
    kwargs: undefined,
    messageId: undefined,
    redelivered: false,
    attempt: 1,
    wantResult: true,
    ...more,
  };
}

const run = (tasks: RunTask[], rssEachTask = false, maxResultBytes = 1024 * 1024) => ({
  type: 'run' as const,
  tasks,
  timeoutMs: 5_000,
  rssEachTask,
  maxResultBytes,
});

test('tasks run one at a time, in order, each reported before the next starts', async () => {
  const order: string[] = [];
  const { r, results } = runner({
    async slow(x: unknown) {
      order.push(`start ${x}`);
      await new Promise((resolve) => setTimeout(resolve, 5));
      order.push(`end ${x}`);
      return x;
    },
  });
  const tasks = [task('slow', [1]), task('slow', [2]), task('slow', [3])];
  r.onMessage(run(tasks));
  await r.idle;
  assert.deepEqual(order, ['start 1', 'end 1', 'start 2', 'end 2', 'start 3', 'end 3']);
  assert.deepEqual(
    results.map((l) => [l.taskId, l.ok, l.ok ? l.resultJson : undefined]),
    tasks.map((t, i) => [t.taskId, true, String(i + 1)]),
  );
  for (const line of results) assert.ok(typeof line.ranMs === 'number' && line.ranMs >= 0);
});

test('args and kwargs: fn(...args), or fn(...args, kwargs) when kwargs is given', async () => {
  const { r, results } = runner({ join: (...a: unknown[]) => a });
  r.onMessage(run([task('join', [1, 2]), task('join', [1], { kwargs: { k: 'v' } })]));
  await r.idle;
  assert.deepEqual(
    results.map((l) => (l.ok ? JSON.parse(l.resultJson as string) : l.error)),
    [
      [1, 2],
      [1, { k: 'v' }],
    ],
  );
});

test('a throw, a rejection, an unknown func and an unserialisable result each fail alone', async () => {
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  const { r, results } = runner({
    throws() {
      throw new TypeError('bad input');
    },
    rejects: async () => Promise.reject('a string'),
    cyclic: () => cyclic,
    fine: () => 'ok',
  });
  r.onMessage(run([task('throws'), task('rejects'), task('nope'), task('cyclic'), task('fine')]));
  await r.idle;
  const errors = results.map((l) => (l.ok ? undefined : l.error));
  assert.equal(errors[0]?.name, 'TypeError');
  assert.equal(errors[0]?.message, 'bad input');
  assert.equal(errors[1]?.name, 'NonError');
  assert.match(errors[2]?.message ?? '', /unknown func "nope"/);
  assert.match(errors[3]?.message ?? '', /cannot be sent as JSON/);
  assert.equal(results[4]?.ok, true);
});

test('tasks handed over in two frames of one turn all run, in order', async () => {
  const { r, results } = runner({ echo: (x: unknown) => x });
  r.onMessage(run([task('echo', [1]), task('echo', [2])]));
  r.onMessage(run([task('echo', [3])]));
  await r.idle;
  assert.deepEqual(
    results.map((l) => (l.ok ? l.resultJson : l.error.message)),
    ['1', '2', '3'],
  );
});

test('what a task queued as microtasks runs before its result is reported, not during the next task', async () => {
  // A microtask that throws or exits must end the process while its own task is the one
  // running, so that the master blames that task and not the next one.
  const order: string[] = [];
  const r = new TaskRunner({
    funcs: new Map<string, TaskFunction>([
      [
        'queues',
        (x: unknown) => {
          queueMicrotask(() => order.push(`microtask ${x}`));
          return x;
        },
      ],
    ]),
    send: () => {},
    writeResult: (line) => order.push(`report ${line.taskId}`),
  });
  const first = task('queues', ['a'], { wantResult: false });
  const second = task('queues', ['b'], { wantResult: false });
  r.onMessage(run([first, second]));
  await r.idle;
  assert.deepEqual(order, [
    'microtask a',
    `report ${first.taskId}`,
    'microtask b',
    `report ${second.taskId}`,
  ]);
});

test('a thenable that is not a Promise is awaited; a rejection with no reason fails the task', async () => {
  const { r, results } = runner({
    // biome-ignore lint/suspicious/noThenProperty: a thenable of a task's own making, as some libraries return
    thenable: () => ({ then: (resolve: (v: unknown) => void) => setTimeout(() => resolve('later'), 1) }),
    rejectsEmpty: () => Promise.reject(undefined),
    plain: () => 'now',
  });
  r.onMessage(run([task('thenable'), task('rejectsEmpty'), task('plain')]));
  await r.idle;
  assert.deepEqual(
    results.map((l) => [l.ok, l.ok ? l.resultJson : typeof l.error.message]),
    [
      [true, '"later"'],
      [false, 'string'],
      [true, '"now"'],
    ],
  );
});

test('without a reply wanted the result is not serialised', async () => {
  const { r, results } = runner({ big: () => ({ toJSON: () => assert.fail('serialised') }) });
  r.onMessage(run([task('big', [], { wantResult: false })]));
  await r.idle;
  assert.deepEqual(
    results[0] && { ok: results[0].ok, resultJson: results[0].ok ? results[0].resultJson : 1 },
    {
      ok: true,
      resultJson: undefined,
    },
  );
});

test('cancel hands back every task not started, and only those', async () => {
  let release = () => {};
  const { r, sent, results } = runner({
    wait: () =>
      new Promise<void>((resolve) => {
        release = resolve;
      }),
    quick: () => 1,
  });
  const [first, second, third] = [task('wait'), task('quick'), task('quick')];
  r.onMessage(run([first as RunTask, second as RunTask, third as RunTask]));
  await new Promise(setImmediate);
  r.onMessage({ type: 'cancel' });
  assert.deepEqual(sent, [{ type: 'cancelled', taskIds: [second?.taskId, third?.taskId] }]);
  release();
  await r.idle;
  assert.deepEqual(
    results.map((l) => l.taskId),
    [first?.taskId],
  );
});

test("abort fires the running task's AbortSignal with a TimeoutError; another id is ignored", async () => {
  const { r, results } = runner({
    honours: () =>
      new Promise((_, reject) => {
        const signal = currentTask()?.signal as AbortSignal;
        signal.addEventListener('abort', () => reject(signal.reason));
      }),
  });
  const t = task('honours');
  r.onMessage(run([t]));
  await new Promise(setImmediate);
  r.onMessage({ type: 'abort', taskId: t.taskId + 1000, reason: 'not this one' });
  await new Promise(setImmediate);
  assert.equal(results.length, 0);
  r.onMessage({ type: 'abort', taskId: t.taskId, reason: 'the task reached its time limit' });
  await r.idle;
  const line = results[0];
  assert.ok(line !== undefined && !line.ok);
  assert.equal(line.error.name, 'TimeoutError');
  assert.equal(line.error.message, 'the task reached its time limit');
});

test('the task sees its delivery through currentTask()', async () => {
  const { r, results } = runner({ who: () => currentTask() });
  const before = Date.now();
  r.onMessage(run([task('who', [], { messageId: 'm-1', redelivered: true, attempt: 3 })]));
  await r.idle;
  const seen = results[0]?.ok ? JSON.parse(results[0].resultJson as string) : undefined;
  assert.equal(seen.func, 'who');
  assert.equal(seen.messageId, 'm-1');
  assert.equal(seen.redelivered, true);
  assert.equal(seen.attempt, 3);
  assert.ok(seen.deadline >= before + 5_000);
});

test("a Job's frame carries redelivered, attempt and wantResult only when unusual; the child reads the usual ones", async () => {
  const request = (more: Partial<TaskRequest>) => taskRequest('who', [], { wantResult: false, ...more });
  const usual = new Job(1, request({}), () => {}).frame(undefined);
  assert.deepEqual(Object.keys(JSON.parse(JSON.stringify(usual))).sort(), ['args', 'func', 'taskId']);
  const unusual = new Job(2, request({ redelivered: true, attempt: 2, wantResult: true }), () => {}).frame(
    undefined,
  );
  const seen: unknown[] = [];
  const { r, results } = runner({
    who: () => {
      const t = currentTask();
      seen.push([t?.redelivered, t?.attempt]);
      return 'r';
    },
  });
  // Through JSON, as the IPC channel carries them.
  r.onMessage(run(JSON.parse(JSON.stringify([usual, unusual]))));
  await r.idle;
  assert.deepEqual(seen, [
    [false, 1],
    [true, 2],
  ]);
  assert.deepEqual(
    results.map((l) => (l.ok ? l.resultJson : 'failed')),
    [undefined, '"r"'],
  );
});

test('memory is reported after every task with a memory limit, else at most once a second', async () => {
  let reads = 0;
  const rss = () => ++reads * 1000;
  const limited = runner({ f: () => 1 }, rss);
  limited.r.onMessage(run([task('f'), task('f'), task('f')], true));
  await limited.r.idle;
  assert.deepEqual(
    limited.results.map((l) => l.rssBytes),
    [1000, 2000, 3000],
  );
  reads = 0;
  const unlimited = runner({ f: () => 1 }, rss);
  unlimited.r.onMessage(run([task('f'), task('f'), task('f')]));
  await unlimited.r.idle;
  assert.deepEqual(
    unlimited.results.map((l) => l.rssBytes),
    [1000, undefined, undefined],
  );
});

test('a long backlog of synchronous tasks lets the event loop turn, so a cancel is heard', async () => {
  const { r, sent, results } = runner({
    spin() {
      const until = performance.now() + 1;
      while (performance.now() < until) {
        // a synchronous task of about 1 ms
      }
    },
  });
  r.onMessage(run(Array.from({ length: 200 }, () => task('spin'))));
  await new Promise((resolve) => setTimeout(resolve, 20));
  r.onMessage({ type: 'cancel' });
  await r.idle;
  const cancelled = sent[0]?.type === 'cancelled' ? sent[0].taskIds.length : 0;
  assert.ok(cancelled > 0, 'the cancel came only after the whole backlog');
  assert.equal(results.length + cancelled, 200);
});

test('a result over --max-result-bytes fails the task with a clear error; a small one passes', async () => {
  const { r, results } = runner({ big: (n: unknown) => 'x'.repeat(n as number) });
  r.onMessage(run([task('big', [90]), task('big', [200])], false, 100));
  await r.idle;
  assert.equal(results[0]?.ok, true);
  const over = results[1];
  assert.ok(over !== undefined && !over.ok);
  assert.match(
    over.error.message,
    /^the result is 202 bytes of JSON, over the limit of 100 \(--max-result-bytes\)$/,
  );
});

test('arguments sent as exact JSON reach the task as BigInt, and a BigInt result is replied exactly', async () => {
  const { r, results } = runner({ double: (n: unknown) => (n as bigint) * 2n });
  r.onMessage(run([task('double', [], { exactJson: '{"args":[12345678901234567890]}' })]));
  await r.idle;
  assert.deepEqual(results[0]?.ok && results[0].resultJson, '24691357802469135780');
});
