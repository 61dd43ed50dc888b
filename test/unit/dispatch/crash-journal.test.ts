import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { CrashJournal, crashKey } from '../../../src/dispatch/crash-journal.ts';

function journalPath(t: { after: (fn: () => unknown) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'journal-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return join(dir, 'nested', 'q.crashes.json');
}

test('deaths are written at once and outlive the process that wrote them; forget clears them', (t) => {
  const path = journalPath(t);
  const key = crashKey('id-1', Buffer.from('{"func":"add"}'));
  const first = new CrashJournal(path, 3);
  assert.equal(first.empty, true);
  first.suspect(key);
  first.suspect(key);
  // A new master (a new process) reads what the dead one wrote.
  const second = new CrashJournal(path, 3);
  assert.equal(second.deaths(key), 2);
  assert.equal(second.empty, false);
  second.forget(key);
  assert.equal(new CrashJournal(path, 3).deaths(key), 0);
});

test('keys are digests of the id and the body: never the body, and different for another body or id', (t) => {
  const path = journalPath(t);
  const body = Buffer.from('{"func":"add","args":["secret-customer-data"]}');
  const journal = new CrashJournal(path, 3);
  journal.suspect(crashKey('m', body));
  assert.ok(!readFileSync(path, 'utf8').includes('secret'));
  assert.notEqual(crashKey('m', body), crashKey('n', body));
  assert.notEqual(crashKey(undefined, body), crashKey(undefined, Buffer.from('{}')));
  assert.equal(crashKey(undefined, body), crashKey(undefined, Buffer.from(body)));
});

test('an unreadable journal starts empty; the file stays small', (t) => {
  const path = journalPath(t);
  const journal = new CrashJournal(path, 3);
  for (let i = 0; i < 250; i++) journal.suspect(crashKey(String(i), Buffer.alloc(0)));
  assert.equal(Object.keys(JSON.parse(readFileSync(path, 'utf8'))).length, 100);
  // The newest are kept.
  assert.equal(new CrashJournal(path, 3).deaths(crashKey('249', Buffer.alloc(0))), 1);
  assert.equal(new CrashJournal(join(path, 'missing', 'x.json'), 3).empty, true);
  assert.ok(existsSync(path));
});
