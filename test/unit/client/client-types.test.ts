// The client's types come from the task module: a wrong argument, an unknown task or a
// wrong use of the result is a compile error. The typed() function below is never run:
// tsc --noEmit (npm run typecheck) checks it, and each @ts-expect-error fails the check
// if its line stops being an error. The tests also run tsc themselves, on this file and on
// snippets that must not compile, so that `npm test` alone catches a regression.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { type Client, createClient } from '../../../src/client/client.ts';
import { ClientError, TaskCallError } from '../../../src/errors.ts';
import type * as fixtures from '../../fixtures/tasks.ts';

/** A module with what a task module may hold besides tasks. */
interface Mixed {
  run(n: number): string;
  VERSION: string;
  default: (n: number) => number;
}

async function typed(
  client: Client<typeof import('../../../tasks/index.ts')>,
  fx: Client<typeof fixtures>,
  mixed: Client<Mixed>,
  loose: Client,
): Promise<unknown[]> {
  const sum: number = await client.call('test', [1, 2]);
  // @ts-expect-error: test takes numbers
  await client.call('test', ['a', 2]);
  // @ts-expect-error: test takes two arguments
  await client.call('test', [1]);
  // @ts-expect-error: not three
  await client.call('test', [1, 2, 3]);
  // @ts-expect-error: no such task
  await client.call('nope', []);
  // @ts-expect-error: the result is a number
  const notString: string = await client.call('test', [1, 2]);
  const total: number = await client.call('add', [1, 2, 3]);
  // @ts-expect-error: add takes numbers only
  await client.call('add', [1, '2']);
  const greeting: string = await client.call('greet', ['Ada'], { greeting: 'Hi' });
  const slept: null = await client.call('sleep', [0.5], undefined, { timeoutMs: 5_000 });
  const id: string = await client.send('sleep', [1]);
  // @ts-expect-error: send checks the arguments too
  await client.send('sleep', ['one']);
  const ids: string[] = await client.sendMany([
    { func: 'test', args: [1, 2] },
    { func: 'sleep', args: [1], options: { priority: 9 } },
  ]);
  // @ts-expect-error: sendMany checks each task's arguments against its own function
  await client.sendMany([{ func: 'sleep', args: [1, 2] }]);
  // @ts-expect-error: and its name
  await client.sendMany([{ func: 'nope', args: [] }]);
  const fromFixtures: number = await fx.call('add', [1, 2]);
  // @ts-expect-error: the fixtures' add takes two numbers
  await fx.call('add', ['1', '2']);
  const ran: string = await mixed.call('run', [1]);
  // @ts-expect-error: a constant is not a task
  await mixed.call('VERSION', []);
  // @ts-expect-error: nor is the default export
  await mixed.call('default', [1]);
  // Without a task module: any name, any arguments, a result of unknown type.
  const anything: unknown = await loose.call('whatever', [1, 'two', { three: 3 }]);
  // @ts-expect-error: unknown is not a number
  const notNumber: number = await loose.call('whatever', []);
  const typedClient: Client<typeof fixtures> = await createClient<typeof fixtures>();
  return [
    sum,
    notString,
    total,
    greeting,
    slept,
    id,
    ids,
    fromFixtures,
    ran,
    anything,
    notNumber,
    typedClient,
  ];
}

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const TSC = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');

/** Runs tsc on `files` with the project's options; resolves with its output and exit code. */
async function tsc(files: string[]): Promise<{ code: number; output: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'client-types-'));
  try {
    const config = join(dir, 'tsconfig.json');
    writeFileSync(
      config,
      JSON.stringify({
        extends: join(ROOT, 'tsconfig.json'),
        compilerOptions: { typeRoots: [join(ROOT, 'node_modules', '@types')] },
        files,
        include: [],
      }),
    );
    try {
      const { stdout } = await promisify(execFile)(process.execPath, [TSC, '--noEmit', '-p', config], {
        cwd: ROOT,
      });
      return { code: 0, output: stdout };
    } catch (err) {
      const e = err as { code: number; stdout: string; stderr: string };
      return { code: e.code, output: `${e.stdout}${e.stderr}` };
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('this file type-checks: every wrong call above is a compile error, every right one is not', async () => {
  assert.equal(typeof typed, 'function');
  const { code, output } = await tsc([fileURLToPath(import.meta.url)]);
  assert.equal(output, '');
  assert.equal(code, 0);
});

test('a wrong argument, an unknown task and a misused result do not compile', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'client-types-snippet-'));
  try {
    const snippet = join(dir, 'wrong.mts');
    const client = JSON.stringify(join(ROOT, 'src', 'client', 'client.ts'));
    const tasks = JSON.stringify(join(ROOT, 'tasks', 'index.ts'));
    writeFileSync(
      snippet,
      [
        `import { createClient } from ${client};`,
        `const c = await createClient<typeof import(${tasks})>();`,
        `await c.call('test', ['a', 2]);`,
        `await c.call('nope', []);`,
        `const s: string = await c.call('test', [1, 2]);`,
        `export const ok: number = await c.call('test', [1, 2]);`,
        `export { s };`,
      ].join('\n'),
    );
    const { code, output } = await tsc([snippet]);
    assert.notEqual(code, 0);
    const errors = output.split('\n').filter((l) => l.includes('error TS'));
    // Lines 3, 4 and 5 of the snippet, and nothing else.
    assert.deepEqual(
      errors.map((l) => /wrong\.mts\((\d+),/.exec(l)?.[1]),
      ['3', '4', '5'],
      output,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the errors are values with a stable code', () => {
  const failed = new TaskCallError('failed', 'boom');
  assert.ok(failed instanceof Error);
  assert.equal(failed.name, 'TaskCallError');
  assert.equal(failed.code, 'ERR_TASK_CALL');
  assert.equal(failed.kind, 'failed');
  assert.equal(failed.message, 'boom');
  const cause = new Error('underneath');
  const timeout = new ClientError('ERR_CALL_TIMEOUT', 'no result', { cause });
  assert.ok(timeout instanceof Error);
  assert.equal(timeout.name, 'ClientError');
  assert.equal(timeout.code, 'ERR_CALL_TIMEOUT');
  assert.equal(timeout.cause, cause);
});
