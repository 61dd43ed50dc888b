// The pool where no FIFO can be made (no mkfifo on the PATH): results take the socket pair
// Node makes for a 'pipe', and nothing else changes. In a file of its own: the pool
// remembers for the rest of the process that mkfifo failed.
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import pino from 'pino';
import { Pool } from '../../src/pool/pool.ts';
import { FIXTURE_TASKS, taskRequest as request } from '../support/helpers.ts';

test('without mkfifo the results take a socket pair: tasks succeed, and a crash keeps what finished before it', {
  skip: process.platform !== 'linux',
}, async (t) => {
  const path = process.env.PATH;
  process.env.PATH = '/nonexistent';
  t.after(() => {
    process.env.PATH = path;
  });
  const p = new Pool({
    size: 1,
    moduleUrl: pathToFileURL(FIXTURE_TASKS).href,
    taskTimeoutMs: 5_000,
    logger: pino({ level: 'silent' }),
  });
  t.after(() => p.close(0));
  await p.start();
  const first = await p.run(request('pid'));
  assert.equal(first.outcome, 'succeeded');
  const pid = Number(first.outcome === 'succeeded' ? first.resultJson : 0);
  assert.ok(statSync(`/proc/${pid}/fd/4`).isSocket());
  const results = await Promise.all([p.run(request('add', [1, 2])), p.run(request('crash'))]);
  assert.deepEqual(
    results.map((r) => r.outcome),
    ['succeeded', 'crashed'],
  );
});
