// Per-task control against the real CLI and broker (README "Per-task options", "Priorities",
// "Delayed tasks", "Cancel"): options declared beside each function, priorities, x-delay and
// cancel by message id. Each test counts what ran, and how often.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import type { GetMessage } from 'amqplib';
import { delayQueueName } from '../../src/amqp/delay.ts';
import {
  freshName,
  gate,
  getJson,
  seriesAt,
  spawnCli,
  startCliService,
  waitFor,
} from '../support/helpers.ts';

const TASKS = new URL('../fixtures/controlled-tasks.ts', import.meta.url).pathname;
const TOKEN = 'per-task-token';
const header = (m: GetMessage | undefined, name: string) => m?.properties.headers?.[name];
const lines = (path: string) =>
  existsSync(path) ? readFileSync(path, 'utf8').trim().split('\n').filter(Boolean) : [];

function scratch(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'per-task-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const start = (t: TestContext, queue: string, extra: string[] = []) =>
  startCliService(t, queue, ['--task-path', TASKS, ...extra], { SHUTDOWN_TOKEN: TOKEN });

test('options beside each task: its own time limit, retries, concurrency and rate, whatever the flags', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const { b, port } = await start(t, queue, [
    '--worker-timeout',
    '30',
    '--max-retries',
    '0',
    '--workers',
    '4',
  ]);
  const startedAt = Date.now();
  await b.send(queue, { func: 'slow', args: [20] }, { messageId: 'slow' });
  await b.send(queue, { func: 'flaky', args: [join(dir, 'flaky')] }, { messageId: 'flaky' });
  for (let i = 0; i < 4; i++) await b.send(queue, { func: 'single', args: [join(dir, 'single'), `s${i}`] });
  for (let i = 0; i < 20; i++) await b.send(queue, { func: 'rated', args: [join(dir, 'rated')] });

  const dead = await b.take(`${queue}.dead`, 2, 30_000);
  const byId = new Map(dead.map((m) => [String(m.properties.messageId), m]));
  // timeout: 1 — not the 30 s of --worker-timeout.
  assert.equal(header(byId.get('slow'), 'x-error-kind'), 'timeout');
  assert.match(String(header(byId.get('slow'), 'x-error-message')), /time limit of 1 s/);
  // maxRetries: 2 — three runs, though --max-retries is 0.
  assert.equal(header(byId.get('flaky'), 'x-error-kind'), 'failed');
  assert.equal(header(byId.get('flaky'), 'x-attempts'), 3);
  assert.deepEqual(lines(join(dir, 'flaky')), ['1', '2', '3']);

  await waitFor(
    'the 20 rated and 4 single ran',
    () => lines(join(dir, 'rated')).length === 20 && lines(join(dir, 'single')).length === 8,
  );
  // concurrency: 1 — each start after the end before it.
  let open = 0;
  for (const line of lines(join(dir, 'single'))) {
    open += line.startsWith('start') ? 1 : -1;
    assert.ok(open <= 1, `two runs of single at once: ${lines(join(dir, 'single')).join(' | ')}`);
  }
  // rateLimit: '5/s' — 20 starts take at least 2.5 s (a sliding window: 3 s), and no second holds more than 5.
  const starts = lines(join(dir, 'rated')).map(Number);
  const span = (starts.at(-1) as number) - (starts[0] as number);
  t.diagnostic(
    `20 rated starts over ${span} ms; slow timed out ${Date.now() - startedAt} ms after the start`,
  );
  assert.ok(span >= 2_500, `20 runs started within ${span} ms`);
  // The master counts starts when it hands a task over; the worker's clock sees it a little
  // later, by a varying amount on a busy machine: hence the slack in the window.
  for (const at of starts)
    assert.ok(
      starts.filter((s) => s >= at && s < at + 1000 - 150).length <= 5,
      `more than 5 starts within 850 ms of ${at}: ${starts.join(' ')}`,
    );
  assert.ok(
    ((await seriesAt(port, 'amqp_concurrency_tasks_held_back_total{func="rated",limit="rate"}')) as number) >
      0,
  );
  assert.ok(
    ((await seriesAt(
      port,
      'amqp_concurrency_tasks_held_back_total{func="single",limit="concurrency"}',
    )) as number) > 0,
  );
  const status = await fetch(`http://127.0.0.1:${port}/status`, {
    headers: { authorization: `Bearer ${TOKEN}` },
  });
  const funcs = ((await status.json()) as { funcs: Record<string, Record<string, unknown>> }).funcs;
  assert.deepEqual(funcs.rated, { rateLimit: '5/s', running: 0 });
  assert.equal(funcs.slow?.timeoutMs, 1000);
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('an invalid option stops start-up: exit 2, one line naming the task and the option', async (t) => {
  const dir = scratch(t);
  const module = join(dir, 'bad-options.mjs');
  writeFileSync(module, 'export function resize() {}\nresize.options = { timeout: 120, concurency: 2 };\n');
  const cli = spawnCli(t, ['--queue', freshName(t), '--task-path', module, '--http-port', '0']);
  const { code } = await cli.exit;
  assert.equal(code, 2);
  const line = cli.stderr().trim().split('\n').at(-1) as string;
  assert.match(line, /task "resize": unknown option "concurency"/);
});

test('priorities: with --max-priority 10 and one worker, 5 of priority 9 behind 40 of priority 0 run among the first 10', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const { b, port } = await start(t, queue, ['--max-priority', '10', '--workers', '1']);
  const ran = join(dir, 'ran');
  // The one worker is busy until the test opens the gate, so all 45 are queued behind it
  // (in the master or the queue), however long publishing them takes.
  const held = gate(t);
  await b.send(queue, { func: 'note', args: [ran, 'gate', 0, held.path] });
  await waitFor('the gate runs', () => lines(ran).length === 1);
  for (let i = 0; i < 40; i++)
    await b.send(queue, { func: 'note', args: [ran, `low${i}`, 20] }, { priority: 0 });
  for (let i = 0; i < 5; i++)
    await b.send(queue, { func: 'note', args: [ran, `high${i}`, 20] }, { priority: 9 });
  assert.equal(lines(ran).length, 1, 'all 45 were queued while the gate ran');
  held.open();
  await waitFor('all 45 ran', () => lines(ran).length === 46, 60_000);
  const firstTen = lines(ran)
    .slice(1, 11)
    .map((l) => l.split(' ')[0]);
  t.diagnostic(`first ten: ${firstTen.join(' ')}`);
  assert.equal(firstTen.filter((id) => id?.startsWith('high')).length, 5);
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('x-delay: 3000 runs no earlier than 3 s after it was published, and is never unacked here meanwhile', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const { b, port } = await start(t, queue);
  const ran = join(dir, 'ran');
  const sentAt = Date.now();
  await b.send(
    queue,
    { func: 'note', args: [ran, 'late'] },
    { headers: { 'x-delay': 3000 }, messageId: 'late' },
  );
  await b.send(queue, { func: 'note', args: [ran, 'now'] });
  await waitFor('the undelayed one ran', () => lines(ran).length === 1);
  await waitFor('the delayed one waits in a delay queue, not here', async () => {
    const health = await getJson(port, '/health');
    return health.body.tasksInFlight === 0 && (await b.count(queue)) === 0;
  });
  // Only when the machine got here within the delay: the time check below is the proof.
  if (Date.now() - sentAt < 2_500) assert.equal(lines(ran).length, 1, 'not yet');
  await waitFor('the delayed one ran', () => lines(ran).length === 2, 20_000);
  const [id, at] = (lines(ran)[1] as string).split(' ');
  assert.equal(id, 'late');
  const waited = Number(at) - sentAt;
  t.diagnostic(`ran ${waited} ms after it was published`);
  assert.ok(waited >= 3_000, `ran after ${waited} ms`);
  assert.ok(((await seriesAt(port, 'amqp_concurrency_messages_delayed_total{func="note"}')) as number) >= 1);
  for (const step of [100, 400, 1600]) assert.equal(await b.count(delayQueueName(queue, step)), 0);
  // A delay that cannot be honoured is rejected with its reason.
  await b.send(
    queue,
    { func: 'note', args: [ran, 'bad'] },
    { headers: { 'x-delay': 'soon' }, messageId: 'bad' },
  );
  const [dead] = await b.take(`${queue}.dead`, 1);
  assert.equal(header(dead, 'x-error-kind'), 'rejected');
  assert.match(String(header(dead, 'x-error-message')), /x-delay must be a number of milliseconds/);
});

test('DELETE /tasks/{id}: refused without the token; stops a running task, drops a waiting one, remembers an unseen one', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const { b, port } = await start(t, queue, ['--workers', '1']);
  const del = (id: string, token = TOKEN) =>
    fetch(`http://127.0.0.1:${port}/tasks/${encodeURIComponent(id)}`, {
      method: 'DELETE',
      headers: token === '' ? {} : { authorization: `Bearer ${token}` },
    });
  assert.equal((await del('any', '')).status, 401);
  assert.equal((await del('any', 'wrong')).status, 401);

  const cancelled = join(dir, 'cancelled');
  const ran = join(dir, 'ran');
  await b.send(queue, { func: 'waitForCancel', args: [cancelled] }, { messageId: 'running-one' });
  await b.send(queue, { func: 'note', args: [ran, 'waiting-one'] }, { messageId: 'waiting-one' });
  await waitFor('the first started', () => lines(cancelled).includes('started'));
  const queued = await del('waiting-one');
  assert.deepEqual(await queued.json(), { messageId: 'waiting-one', result: 'queued' });
  const running = await del('running-one');
  assert.deepEqual(await running.json(), { messageId: 'running-one', result: 'running' });
  const unseen = await del('later-one');
  assert.deepEqual(await unseen.json(), { messageId: 'later-one', result: 'remembered' });
  await b.send(queue, { func: 'note', args: [ran, 'later-one'] }, { messageId: 'later-one' });
  await b.send(queue, { func: 'note', args: [ran, 'fine'] }, { messageId: 'fine' });

  const dead = await b.take(`${queue}.dead`, 3, 30_000);
  const byId = new Map(dead.map((m) => [String(m.properties.messageId), m]));
  for (const id of ['running-one', 'waiting-one', 'later-one'])
    assert.equal(header(byId.get(id), 'x-error-kind'), 'cancelled', id);
  assert.match(String(header(byId.get('running-one'), 'x-error-message')), /cancelled while it ran/);
  assert.match(String(header(byId.get('waiting-one'), 'x-error-message')), /cancelled before it ran/);
  // The running one saw its signal (an AbortError, not a TimeoutError); the others never ran.
  assert.deepEqual(lines(cancelled), ['started', 'aborted AbortError']);
  await waitFor('fine ran', () => lines(ran).length === 1);
  assert.deepEqual(
    lines(ran).map((l) => l.split(' ')[0]),
    ['fine'],
  );
  assert.equal(
    await seriesAt(port, 'amqp_concurrency_tasks_total{func="waitForCancel",outcome="cancelled"}'),
    1,
  );
  assert.equal((await getJson(port, '/health')).status, 200);
});

test('a cancel reaches every replica: over HTTP on one, through the control exchange on the others, and from the cancel command', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const one = await start(t, queue, ['--workers', '1', '--prefetch', '1']);
  const two = await start(t, queue, ['--workers', '1', '--prefetch', '1']);
  const { b } = one;
  const marks = [join(dir, 'a'), join(dir, 'b')];
  await b.send(queue, { func: 'waitForCancel', args: [marks[0]] }, { messageId: 'task-a' });
  await b.send(queue, { func: 'waitForCancel', args: [marks[1]] }, { messageId: 'task-b' });
  await waitFor('both started, one on each replica', () => marks.every((m) => lines(m).includes('started')));
  const answers: string[] = [];
  for (const id of ['task-a', 'task-b']) {
    const res = await fetch(`http://127.0.0.1:${one.port}/tasks/${id}`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${TOKEN}` },
    });
    answers.push(((await res.json()) as { result: string }).result);
  }
  // The first replica runs one of them; the other is remembered there and stopped by the second.
  assert.deepEqual(answers.sort(), ['remembered', 'running']);
  const dead = await b.take(`${queue}.dead`, 2, 30_000);
  assert.deepEqual(
    dead.map((m) => header(m, 'x-error-kind')),
    ['cancelled', 'cancelled'],
  );
  for (const m of marks) assert.deepEqual(lines(m), ['started', 'aborted AbortError']);

  // The answers cross the broker from both replicas: a wait with room for a busy machine.
  const cli = spawnCli(t, ['cancel', 'not-yet-sent', '--queue', queue, '--wait', '4']);
  assert.equal((await cli.exit).code, 0, cli.stderr());
  const replies = cli.stdout().trim().split('\n');
  assert.equal(replies.length, 2, cli.stdout());
  for (const line of replies) assert.match(line, /\tremembered$/);
  await two.b.send(queue, { func: 'note', args: [join(dir, 'never'), 'x'] }, { messageId: 'not-yet-sent' });
  const [late] = await b.take(`${queue}.dead`, 1, 30_000);
  assert.equal(header(late, 'x-error-kind'), 'cancelled');
  assert.deepEqual(lines(join(dir, 'never')), []);

  const nobody = spawnCli(t, ['cancel', 'x', '--queue', `${queue}-none`, '--wait', '0.5']);
  assert.equal((await nobody.exit).code, 1);
  assert.match(nobody.stderr(), /no service has consumed/);
});
