// What production does to a queue worker, done to the real CLI: hostile bodies, odd task
// failures, operator storms and an error nobody caught. The master must stay up (or, for
// the last, come back and break the loop), and every message must end in one outcome.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { crashJournalPath } from '../../src/dispatch/crash-journal.ts';
import {
  broker,
  cliArgs,
  deleteExchangesAfter,
  freshName,
  getJson,
  readyPort,
  spawnCli,
  startCliService,
  waitFor,
} from '../support/helpers.ts';

const TOKEN = 'hostile-test-token';
const BOMB = fileURLToPath(new URL('../fixtures/master-bomb.ts', import.meta.url));

async function putWorkers(port: number, count: number): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}/workers`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ count }),
  });
  return res.status;
}

test('hostile bodies and odd throws: each ends alone in the dead-letter queue, the master stays up, no body is quoted', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '2']);
  const deep = `${'['.repeat(5_000)}1${']'.repeat(5_000)}`;
  const bodies: [string, string | Buffer, string, RegExp][] = [
    ['deep', `{"func":"add","args":[${deep},1]}`, 'rejected', /nested deeper than 64 levels/],
    [
      'secret',
      'hunter2-token-of-a-customer not json',
      'rejected',
      /^body is not JSON: unexpected character at byte 0$/,
    ],
    ['odd', JSON.stringify({ func: 'throwOddError' }), 'failed', /not/],
    ['hostile', JSON.stringify({ func: 'throwHostileError' }), 'failed', /without a message/],
    ['proto', '{"func":"__proto__","args":[]}', 'rejected', /unknown func/],
    ['ctor', '{"func":"constructor"}', 'rejected', /unknown func/],
  ];
  for (const [id, body] of bodies) await b.send(queue, Buffer.from(body), { messageId: id });
  await b.send(queue, { func: 'add', args: [1, 2] }, { messageId: 'fine' });
  const dead = await b.take(`${queue}.dead`, bodies.length, 30_000);
  const byId = new Map(dead.map((m) => [String(m.properties.messageId), m]));
  for (const [id, , kind, reason] of bodies) {
    const headers = byId.get(id)?.properties.headers ?? {};
    assert.equal(headers['x-error-kind'], kind, id);
    assert.match(String(headers['x-error-message']), reason, id);
    assert.ok(!String(headers['x-error-message']).includes('hunter2'), 'the body is never quoted');
  }
  assert.ok(!cli.stdout().includes('hunter2'), 'nor logged');
  await waitFor('the queue empty and all settled', async () => {
    const health = await getJson(port, '/health');
    return (await b.count(queue)) === 0 && health.body.tasksInFlight === 0;
  });
  assert.equal((await getJson(port, '/health')).status, 200);
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
});

test('scaling to 8 then, 30 ms later, to 1 while they boot does not stop the service', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, [], { SHUTDOWN_TOKEN: TOKEN });
  assert.equal(await putWorkers(port, 8), 202);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(await putWorkers(port, 1), 202);
  await waitFor('one worker, nothing else starting', async () => {
    const w = (await getJson(port, '/health')).body.workers as { desired: number; up: number };
    return (
      w.desired === 1 && w.up === 1 && (await getJson(port, '/status').catch(() => undefined)) !== undefined
    );
  });
  // Twice more, the other way round.
  for (const [a, z] of [
    [6, 2],
    [1, 3],
  ] as const) {
    assert.equal(await putWorkers(port, a), 202);
    assert.equal(await putWorkers(port, z), 202);
  }
  await waitFor('three workers up', async () => {
    const w = (await getJson(port, '/health')).body.workers as { desired: number; up: number };
    return w.desired === 3 && w.up === 3;
  });
  await b.send(queue, { func: 'add', args: [1, 2] });
  await waitFor('the task to run', async () => (await b.count(queue)) === 0);
  assert.equal(cli.child.exitCode, null, 'still running');
  assert.ok(!cli.logs().some((l) => l.msg === 'cannot go on'), 'no fatal error');
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
});

test('a storm of ten SIGHUPs, ten SIGTTINs and ten SIGTTOUs under load: the service stays up and converges; nothing lost', async (t) => {
  const queue = freshName(t);
  const { b, cli, port } = await startCliService(t, queue, ['--workers', '2']);
  const replies = await b.channel.assertQueue('', { exclusive: true });
  const n = 300;
  for (let i = 0; i < n; i++)
    await b.send(queue, { func: 'sleep', args: [0.01] }, { replyTo: replies.queue, correlationId: `c${i}` });
  for (let i = 0; i < 10; i++) {
    cli.child.kill('SIGHUP');
    cli.child.kill('SIGTTIN');
    cli.child.kill('SIGTTOU');
  }
  for (let i = 0; i < 5; i++) cli.child.kill('SIGHUP');
  const got = await b.take(replies.queue, n, 120_000);
  assert.equal(new Set(got.map((m) => m.properties.correlationId)).size, n, 'every task answered');
  // The kernel merges a pending signal with the same one sent again, so how many TTINs and
  // TTOUs arrived is not known: the pool must converge on whatever size they asked for.
  await waitFor('the pool to converge', async () => {
    const w = (await getJson(port, '/health')).body.workers as { desired: number; up: number };
    return w.up === w.desired && w.desired >= 1;
  });
  assert.equal(cli.child.exitCode, null, 'still running');
  assert.equal(await b.count(`${queue}.dead`), 0);
  cli.child.kill('SIGTERM');
  assert.equal((await cli.exit).code, 0);
});

test('a message the master dies on: after three deaths the next master dead-letters it as crashed and goes on', async (t) => {
  const queue = freshName(t);
  const journal = crashJournalPath(tmpdir(), queue);
  t.after(() => rmSync(journal, { force: true }));
  const b = await broker(t);
  b.cleanup(queue, `${queue}.dead`);
  deleteExchangesAfter(t, `${queue}.x`);
  // Declare the queue as the service does, so the messages wait for it.
  const first = spawnCli(t, cliArgs(queue));
  const firstPort = await readyPort(first);
  await waitFor('the queue declared', async () => (await getJson(firstPort, '/health')).status === 200);
  first.child.kill('SIGTERM');
  await first.exit;
  await b.send(queue, { func: 'add', args: ['MASTER-BOMB', 1] }, { messageId: 'bomb' });
  const env = { NODE_OPTIONS: `--import ${BOMB}` };
  for (let death = 1; death <= 3; death++) {
    const cli = spawnCli(t, cliArgs(queue), env);
    const { code } = await cli.exit;
    assert.equal(code, 1, `death ${death}`);
    assert.ok(cli.logs().some((l) => l.msg === 'an error nobody caught: stopping'));
  }
  const survivor = spawnCli(t, cliArgs(queue), env);
  const port = await readyPort(survivor);
  const [dead] = await b.take(`${queue}.dead`, 1, 30_000);
  assert.equal(dead?.properties.messageId, 'bomb');
  assert.equal(dead?.properties.headers?.['x-error-kind'], 'crashed');
  assert.match(String(dead?.properties.headers?.['x-error-message']), /stopped 3 times/);
  // It goes on: other work runs.
  await b.send(queue, { func: 'add', args: [2, 3] });
  await waitFor('the queue empty', async () => (await b.count(queue)) === 0);
  assert.equal((await getJson(port, '/health')).status, 200);
  survivor.child.kill('SIGTERM');
  assert.equal((await survivor.exit).code, 0);
});
