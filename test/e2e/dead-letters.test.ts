// The morning after, against the real CLI and broker (README "Dead letters"): list what
// died and why, replay it once the bug is fixed, purge what is hopeless. Each replay
// counts the runs it caused: exactly one per dead letter.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import {
  type Broker,
  freshName,
  type SpawnedCli,
  spawnCli,
  startCliService,
  waitFor,
} from '../support/helpers.ts';

const TASKS = new URL('../fixtures/controlled-tasks.ts', import.meta.url).pathname;
const lines = (path: string) =>
  existsSync(path) ? readFileSync(path, 'utf8').trim().split('\n').filter(Boolean) : [];

/** The service on `queue` with these tests' task module, bound to the exchange with routing key `rk`. */
function deadLetterService(
  t: TestContext,
  queue: string,
  extra: string[] = [],
  env?: Record<string, string>,
) {
  return startCliService(t, queue, ['--task-path', TASKS, '--routing-key', 'rk', ...extra], env);
}

function scratch(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'dead-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function dead(
  t: TestContext,
  queue: string,
  ...args: string[]
): Promise<{ code: number | null; cli: SpawnedCli }> {
  const cli = spawnCli(t, ['dead', ...args, '--queue', queue, '--exchange', `${queue}.x`]);
  const { code } = await cli.exit;
  return { code, cli };
}

/**
 * Puts `n` dead letters of `note` tasks (ids m0 to m(n-1), died at 0 to n-1) straight into
 * `<queue>.dead`, as the service writes them, and waits until they are counted.
 */
async function bury(b: Broker, queue: string, ran: string, n: number): Promise<void> {
  // Published together and confirmed once: thousands one by one would take the test's time.
  for (let i = 0; i < n; i++)
    b.channel.sendToQueue(
      `${queue}.dead`,
      Buffer.from(JSON.stringify({ func: 'note', args: [ran, `m${i}`] })),
      {
        persistent: true,
        messageId: `m${i}`,
        headers: {
          'x-error-kind': 'failed',
          'x-error-message': 'it failed',
          'x-attempts': 1,
          'x-original-routing-key': 'rk',
          'x-died-at': i,
        },
      },
    );
  await b.channel.waitForConfirms();
  await waitFor('all dead', async () => (await b.count(`${queue}.dead`)) === n);
}

const jsonLines = (cli: SpawnedCli) =>
  cli
    .stdout()
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);

test('dead list, replay and purge: what died and why, replayed once each after the fix, the hopeless purged', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const { b } = await deadLetterService(t, queue);
  const ran = join(dir, 'ran');
  const fixed = join(dir, 'fixed');
  for (let i = 0; i < 10; i++)
    await b.send(queue, { func: 'buggy', args: [ran, `b${i}`, fixed] }, { messageId: `b${i}` });
  for (let i = 0; i < 10; i++) await b.send(queue, { func: 'nope', args: [] }, { messageId: `r${i}` });
  await waitFor('20 dead letters', async () => (await b.count(`${queue}.dead`)) === 20);

  const all = await dead(t, queue, 'list', '--json');
  assert.equal(all.code, 0, all.cli.stderr());
  const listed = jsonLines(all.cli);
  assert.equal(listed.length, 20);
  for (const letter of listed) {
    assert.ok(typeof letter.messageId === 'string' && typeof letter.kind === 'string');
    assert.equal(letter.body, undefined, 'no body unless asked');
    assert.equal(typeof letter.diedAt, 'number');
  }
  assert.equal(listed.filter((l) => l.func === 'buggy' && l.kind === 'failed').length, 10);
  assert.match(all.cli.stderr(), /listed 20 of 20/);

  const bodies = await dead(t, queue, 'list', '--json', '--show-body', '--func', 'buggy');
  const withBodies = jsonLines(bodies.cli);
  assert.equal(withBodies.length, 10);
  for (const l of withBodies) assert.match(String(l.body), /"func":"buggy"/);
  assert.equal(jsonLines((await dead(t, queue, 'list', '--json', '--kind', 'rejected')).cli).length, 10);
  const table = await dead(t, queue, 'list', '--kind', 'failed', '--limit', '3');
  assert.equal(table.cli.stdout().trim().split('\n').length, 4, 'a header and three rows');
  assert.match(table.cli.stdout(), /^ID\tFUNC\tKIND/);

  const dry = await dead(t, queue, 'replay', '--kind', 'failed', '--dry-run');
  assert.equal(dry.code, 0);
  assert.match(dry.cli.stderr(), /would replay 10 of 20/);
  // What a pass gives back by closing its channel is counted again a moment later.
  await waitFor('a dry run moves nothing: all 20 back', async () => (await b.count(`${queue}.dead`)) === 20);
  assert.equal(lines(ran).length, 10, 'and runs nothing');

  writeFileSync(fixed, '');
  const replay = await dead(t, queue, 'replay', '--kind', 'failed');
  assert.equal(replay.code, 0, replay.cli.stderr());
  assert.match(replay.cli.stderr(), /replayed 10 of 20/);
  await waitFor('each replayed once', () => lines(ran).length === 20);
  const counts = new Map<string, number>();
  for (const id of lines(ran)) counts.set(id, (counts.get(id) ?? 0) + 1);
  for (let i = 0; i < 10; i++) assert.equal(counts.get(`b${i}`), 2, `b${i} ran once before and once more`);
  await waitFor('only the rejected are left', async () => (await b.count(`${queue}.dead`)) === 10);

  const refused = await dead(t, queue, 'purge', '--kind', 'rejected');
  assert.equal(refused.code, 2);
  assert.match(refused.cli.stderr(), /add --yes/);
  const purge = await dead(t, queue, 'purge', '--kind', 'rejected', '--yes');
  assert.equal(purge.code, 0);
  await waitFor('the dead-letter queue empty', async () => (await b.count(`${queue}.dead`)) === 0);
  assert.equal(lines(ran).length, 20, 'nothing ran again meanwhile');
});

test('2,000 dead letters replayed while the service runs: each runs exactly once', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const { b } = await deadLetterService(t, queue, ['--workers', '2']);
  const ran = join(dir, 'ran');
  const n = 2_000;
  await bury(b, queue, ran, n);
  const replay = await dead(t, queue, 'replay');
  assert.equal(replay.code, 0, replay.cli.stderr());
  await waitFor('all ran', () => lines(ran).length >= n, 120_000);
  const ids = lines(ran).map((l) => l.split(' ')[0]);
  assert.equal(new Set(ids).size, n);
  assert.equal(ids.length, n, 'none twice');
  await waitFor('the dead-letter queue empty', async () => (await b.count(`${queue}.dead`)) === 0);
});

test('dead: bad usage is one line and exit 2', async (t) => {
  const queue = freshName(t);
  for (const [args, message] of [
    [['nuke'], /dead: say list, replay or purge/],
    [['list', '--kind', 'oops'], /--kind: must be one of failed, timeout, crashed, rejected, cancelled/],
    [['list', '--older-than', 'yesterday'], /--older-than: must be a duration/],
    [['list', '--limit', '0'], /--limit: must be a whole number/],
    [['purge', '--dry-run', '--yes'], /--dry-run: only with replay/],
  ] as [string[], RegExp][]) {
    const { code, cli } = await dead(t, queue, ...args);
    assert.equal(code, 2, args.join(' '));
    assert.match(cli.stderr(), message);
  }
});

test('the same over HTTP, behind the operator token: GET /dead, POST /dead/replay and /dead/purge', async (t) => {
  const queue = freshName(t);
  const { b, port } = await deadLetterService(t, queue, [], { SHUTDOWN_TOKEN: 'dead-token' });
  for (let i = 0; i < 4; i++) await b.send(queue, { func: 'nope' }, { messageId: `r${i}` });
  await waitFor('4 dead letters', async () => (await b.count(`${queue}.dead`)) === 4);
  const call = (method: string, path: string, body?: unknown, token = 'dead-token') =>
    fetch(`http://127.0.0.1:${port}${path}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
  assert.equal((await call('GET', '/dead', undefined, 'wrong')).status, 401);
  const listed = (await (await call('GET', '/dead?kind=rejected&limit=3')).json()) as {
    letters: { messageId: string; body?: string }[];
    matched: number;
  };
  assert.equal(listed.letters.length, 3);
  assert.equal(listed.letters[0]?.body, undefined);
  assert.equal((await call('GET', '/dead?kind=nonsense')).status, 400);
  const dry = (await (await call('POST', '/dead/replay', { dryRun: true })).json()) as {
    matched: number;
    acted: number;
  };
  assert.deepEqual([dry.matched, dry.acted], [4, 0]);
  assert.equal((await call('POST', '/dead/purge', { kind: 'rejected' })).status, 400, 'purge asks for yes');
  const purged = (await (await call('POST', '/dead/purge', { kind: 'rejected', yes: true })).json()) as {
    acted: number;
  };
  assert.equal(purged.acted, 4);
  await waitFor('the dead-letter queue empty', async () => (await b.count(`${queue}.dead`)) === 0);
});

test('a replay killed midway loses nothing, and the next pass names what may now be in both queues', async (t) => {
  const queue = freshName(t);
  const dir = scratch(t);
  const stateDir = join(dir, 'state');
  const { b } = await deadLetterService(t, queue, ['--workers', '2']);
  const ran = join(dir, 'ran');
  const n = 1_500;
  await bury(b, queue, ran, n);
  const replay = spawnCli(t, [
    'dead',
    'replay',
    '--queue',
    queue,
    '--exchange',
    `${queue}.x`,
    '--state-dir',
    stateDir,
  ]);
  await waitFor('a part replayed', () => lines(ran).length >= 200, 60_000);
  replay.child.kill('SIGKILL');
  await replay.exit;
  // What the killed pass held goes back; what it sent runs.
  await waitFor('the work queue empty and settled', async () => (await b.count(queue)) === 0);
  await waitFor('the dead letters back', async () => {
    const ranIds = new Set(lines(ran).map((l) => l.split(' ')[0]));
    return ranIds.size + (await b.count(`${queue}.dead`)) >= n;
  });
  const listed = await dead(t, queue, 'list', '--json', '--state-dir', stateDir);
  const stillDead = new Set(jsonLines(listed.cli).map((l) => String(l.messageId)));
  const ranIds = new Set(lines(ran).map((l) => l.split(' ')[0]));
  for (let i = 0; i < n; i++) assert.ok(ranIds.has(`m${i}`) || stillDead.has(`m${i}`), `m${i} is nowhere`);
  const inBoth = [...stillDead].filter((id) => ranIds.has(id));
  const reported = Number(/; (\d+) possible duplicates/.exec(listed.cli.stderr())?.[1] ?? 0);
  t.diagnostic(
    `${ranIds.size} ran, ${stillDead.size} still dead, ${inBoth.length} in both, ${reported} reported`,
  );
  assert.ok(reported >= inBoth.length, `${inBoth.length} in both, ${reported} reported`);
  // Finishing the replay: each still-dead letter runs once more; the report is then cleared.
  const rest = await dead(t, queue, 'replay', '--queue', queue, '--state-dir', stateDir);
  assert.equal(rest.code, 0, rest.cli.stderr());
  await waitFor('all ran', () => new Set(lines(ran).map((l) => l.split(' ')[0])).size === n, 60_000);
  const again = await dead(t, queue, 'list', '--state-dir', stateDir);
  assert.doesNotMatch(again.cli.stderr(), /possible duplicates/);
});
