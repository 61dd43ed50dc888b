// The results pipe as a FIFO: a real pipe whose name is gone by the time it is used, and
// nothing made when no FIFO can be made (the child then gets the socket pair).
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { closeSync, fstatSync, mkdtempSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { openResultsFifo } from '../../../src/pool/results-fifo.ts';

/** A temporary directory of the test's own, so that what is left in it is what the FIFO left. */
function ownTmpdir(t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'results-fifo-test-'));
  const before = process.env.TMPDIR;
  process.env.TMPDIR = dir;
  t.after(() => {
    if (before === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = before;
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

test('a FIFO is two ends of one pipe, its name already gone: lines in order, then the end when the writer closes', async (t) => {
  const dir = ownTmpdir(t);
  const fifo = openResultsFifo();
  assert.ok(fifo !== undefined, 'mkfifo is on this machine');
  assert.ok(fstatSync(fifo.readFd).isFIFO() && fstatSync(fifo.writeFd).isFIFO());
  assert.deepEqual(readdirSync(dir), [], 'nothing named is left behind');

  const reader = new Socket({ fd: fifo.readFd, readable: true, writable: false });
  reader.setEncoding('utf8');
  let text = '';
  reader.on('data', (chunk: string) => {
    text += chunk;
  });
  for (let i = 0; i < 1_000; i++) writeSync(fifo.writeFd, `{"taskId":${i}}\n`);
  closeSync(fifo.writeFd);
  await once(reader, 'end');
  const ids = text
    .trimEnd()
    .split('\n')
    .map((line) => (JSON.parse(line) as { taskId: number }).taskId);
  assert.deepEqual(
    ids,
    Array.from({ length: 1_000 }, (_, i) => i),
  );
});

test('no FIFO where none can be made: undefined, nothing left behind, and the command is not tried again', (t) => {
  const dir = ownTmpdir(t);
  const missing = join(dir, 'no-such-mkfifo');
  assert.equal(openResultsFifo(missing), undefined);
  assert.deepEqual(readdirSync(dir), []);
  // Once failed, not run again, even where it would now work: each child would otherwise
  // pay for a failing command.
  writeFileSync(missing, '#!/bin/sh\nexec mkfifo "$@"\n', { mode: 0o755 });
  assert.equal(openResultsFifo(missing), undefined);
  assert.deepEqual(readdirSync(dir), ['no-such-mkfifo']);
});
