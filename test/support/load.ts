// Load for the fault tests, and its accounting: each task appends its id to a file when
// it runs, so that what ran, what ran twice and what never ran (lost) can be counted.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Options } from 'amqplib';
import type { Broker } from './helpers.ts';

/** A fresh file that the `record` fixture appends run ids to; removed at teardown. */
export function runsFile(t: { after: (fn: () => unknown) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'faults-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return join(dir, 'runs.txt');
}

/** How many times each id ran. */
export function runCounts(path: string): Map<string, number> {
  const counts = new Map<string, number>();
  if (!existsSync(path)) return counts;
  for (const id of readFileSync(path, 'utf8').split('\n')) {
    if (id !== '') counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

/**
 * Publishes `n` record tasks with ids `m{from}..m{from+n-1}` (confirmed, in batches so that a
 * large load goes quickly); `options(i)` adds properties (a message id, a reply_to).
 */
export async function publishRecords(
  b: Broker,
  queue: string,
  path: string,
  n: number,
  {
    ms = 5,
    from = 0,
    options = () => ({}),
  }: { ms?: number; from?: number; options?: (i: number) => Options.Publish } = {},
): Promise<void> {
  const BATCH = 200;
  for (let start = from; start < from + n; start += BATCH) {
    const sends: Promise<void>[] = [];
    for (let i = start; i < Math.min(from + n, start + BATCH); i++)
      sends.push(b.send(queue, { func: 'record', args: [path, `m${i}`, ms] }, options(i)));
    await Promise.all(sends);
  }
}

export interface Tally {
  ran: number;
  lost: number;
  duplicates: number;
}

/** What became of ids m0..m{n-1}: ran, never ran, ran more than once (extra runs). */
export function tally(path: string, n: number): Tally {
  const runs = runCounts(path);
  let lost = 0;
  for (let i = 0; i < n; i++) if (!runs.has(`m${i}`)) lost++;
  const duplicates = [...runs.values()].reduce((sum, c) => sum + c - 1, 0);
  return { ran: runs.size, lost, duplicates };
}
