// gunicorn's signals on the real process: TTIN and TTOU resize the pool, HUP reloads.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { freshName, getJson, startCliService, waitFor } from '../support/helpers.ts';

test('SIGTTIN adds a worker, SIGTTOU removes one, SIGHUP runs new task code; nothing lost', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'signals-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const module = join(dir, 'tasks.mjs');
  const write = (v: string) =>
    writeFileSync(module, `export function version() { return ${JSON.stringify(v)}; }`);
  write('v1');
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--task-path', module]);
  const workers = async () =>
    (await getJson(port, '/health')).body.workers as { desired: number; up: number };
  cli.child.kill('SIGTTIN');
  await waitFor('two workers', async () => {
    const w = await workers();
    return w.desired === 2 && w.up === 2;
  });
  cli.child.kill('SIGTTOU');
  await waitFor('one worker', async () => {
    const w = await workers();
    return w.desired === 1 && w.up === 1;
  });
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(queue, { func: 'version' }, { replyTo: replies.queue, correlationId: 'before' });
  const [before] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(before?.content)), { ok: true, result: 'v1' });
  write('v2');
  cli.child.kill('SIGHUP');
  await waitFor('the reload to finish', () => cli.logs().some((l) => l.msg === 'reload done'));
  await b.send(queue, { func: 'version' }, { replyTo: replies.queue, correlationId: 'after' });
  const [after] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(after?.content)), { ok: true, result: 'v2' });
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
  assert.equal(await b.count(`${queue}.dead`), 0);
});
