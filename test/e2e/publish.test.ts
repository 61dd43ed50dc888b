// The producer side as a user meets it: the client, `publish` and `status`, against a
// running service.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { createClient, type TaskCallError } from '../../src/client.ts';
import { parseArg } from '../../src/commands.ts';
import type * as fixtures from '../fixtures/tasks.ts';
import { AMQP_URL, CLI, freshName, ROOT, type spawnCli, startCliService } from '../helpers.ts';

const run = promisify(execFile);

async function service(t: Parameters<typeof spawnCli>[0]) {
  const queue = freshName(t);
  const { port } = await startCliService(t, queue, ['--workers', '2'], { SHUTDOWN_TOKEN: 'tok' });
  return { port, exchange: `${queue}.x` };
}

async function cli(args: string[], env: Record<string, string> = {}) {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args], {
      cwd: ROOT,
      env: { ...process.env, AMQP_URL, ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

test('publish ARGS are JSON where they parse and strings otherwise', () => {
  assert.deepEqual(['1', '"1"', '[1,2]', 'hello', '{"a":1}', 'true'].map(parseArg), [
    1,
    '1',
    [1, 2],
    'hello',
    { a: 1 },
    true,
  ]);
});

test('`publish add 1 2 --wait` prints 3; without --wait it prints the message id; a failure exits 1', async (t) => {
  const s = await service(t);
  const flags = ['--exchange', s.exchange, '--routing-key', 'curio_amqp'];
  const waited = await cli(['publish', 'add', '1', '2', '--wait', ...flags]);
  assert.equal(waited.code, 0, waited.stderr);
  assert.equal(waited.stdout, '3\n');
  const echoed = await cli(['publish', 'echo', 'x', '"7"', '--kwargs', '{"k":true}', '--wait'], {
    EXCHANGE: s.exchange,
  });
  assert.equal(echoed.stdout, '["x","7",{"k":true}]\n');
  const sent = await cli(['publish', 'add', '1', '2', ...flags]);
  assert.equal(sent.code, 0);
  assert.match(sent.stdout, /^[0-9a-f-]{36}\n$/);
  const failed = await cli(['publish', 'fail', 'nope', '--wait', ...flags]);
  assert.equal(failed.code, 1);
  assert.equal(failed.stderr, 'failed: nope\n');
  const bad = await cli(['publish', '--wait']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /^amqp-concurrency: publish: FUNC is missing/);
  assert.equal((await cli(['publish', 'add', '--kwargs', '[1]'])).code, 2);
});

test('the client: send is confirmed with a message id, call returns results and typed errors', async (t) => {
  const s = await service(t);
  const client = await createClient<typeof fixtures>({ url: AMQP_URL, exchange: s.exchange });
  t.after(() => client.close());
  assert.equal(await client.call('add', [20, 22]), 42);
  await assert.rejects(
    client.call('fail', ['boom']),
    (err: TaskCallError) => err.kind === 'failed' && err.message === 'boom',
  );
  const id = await client.send('add', [1, 1], undefined, { messageId: 'given-id' });
  assert.equal(id, 'given-id');
  // Checked by tsc --noEmit, not run: add takes numbers, and the task module's types reach the client.
  const wrongArguments = () => {
    // @ts-expect-error: strings where add wants numbers
    void client.call('add', ['a', 'b']);
  };
  assert.equal(typeof wrongArguments, 'function');
  const lonely = await createClient<typeof fixtures>({
    url: AMQP_URL,
    exchange: s.exchange,
    routingKey: 'nobody-listens',
  });
  t.after(() => lonely.close());
  await assert.rejects(
    lonely.call('add', [1, 2], undefined, { timeoutMs: 200 }),
    (err: TaskCallError) => err.code === 'ERR_CALL_TIMEOUT',
  );
});

test('`status` prints the workers as a table, behind the token', async (t) => {
  const s = await service(t);
  const url = `http://127.0.0.1:${s.port}`;
  const shown = await cli(['status', '--url', url, '--token', 'tok']);
  assert.equal(shown.code, 0, shown.stderr);
  const lines = shown.stdout.split('\n');
  assert.match(lines[0] as string, /^PID\s+STATE\s+FUNC\s+FOR\s+TASKS\s+RSS$/);
  assert.equal(lines.filter((l) => /^\d+\s+(idle|busy)/.test(l)).length, 2);
  assert.match(shown.stdout, /status ok; 2\/2 workers up/);
  const denied = await cli(['status', '--url', url], { SHUTDOWN_TOKEN: 'wrong' });
  assert.equal(denied.code, 1);
  assert.match(denied.stderr, /^status: 401/);
});
