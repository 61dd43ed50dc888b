// The replay journal of `amqp-concurrency dead replay` (README "Dead letters"): what a
// replay has sent, kept on disk so that a replay stopped midway is reported by the next pass.
import { randomBytes } from 'node:crypto';
import { appendFileSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { privateFolder } from '../util/private-folder.ts';

/**
 * The replay journal (README "Dead letters"): a replay writes down each dead letter before
 * it sends its copy, and deletes the list when it ends. A list left behind means a replay
 * was stopped; those of its dead letters that are still in the queue had their copy sent,
 * perhaps confirmed, and never acked: possible duplicates, which the next pass reports.
 */
export class ReplayJournal {
  /** This pass's own list: one per pass, so that two passes at once never erase each other's. */
  readonly path: string;
  /** What stopped passes left: their files, and every dead letter they had sent. */
  readonly #stale: string[];
  readonly #left = new Set<string>();
  readonly problem: string | undefined;

  constructor(base: string) {
    this.path = `${base}.${process.pid}-${randomBytes(4).toString('hex')}`;
    this.problem = privateFolder(dirname(base));
    const prefix = `${basename(base)}.`;
    this.#stale =
      this.problem === undefined
        ? readdirSync(dirname(base))
            .filter((name) => name.startsWith(prefix))
            .map((name) => join(dirname(base), name))
            // Another pass that runs now is not in doubt: its copies are still on their way.
            .filter((file) => !alive(pidOf(file)))
        : [];
    for (const file of this.#stale)
      for (const key of readFileSync(file, 'utf8').split('\n')) if (key !== '') this.#left.add(key);
  }

  /** A dead letter a stopped replay had sent. */
  wasInFlight(key: string): boolean {
    return this.#left.has(key);
  }

  sending(key: string): void {
    if (this.problem === undefined) appendFileSync(this.path, `${key}\n`, { mode: 0o600 });
  }

  /**
   * This pass ended: nothing of its own is in doubt. With `whole` (it read the whole queue,
   * unfiltered), the lists of stopped passes whose process is gone are done with too: what
   * they had sent and is still here was acted on, or reported, now.
   */
  done(whole: boolean): void {
    rmSync(this.path, { force: true });
    if (!whole) return;
    for (const file of this.#stale) rmSync(file, { force: true });
  }
}

/** The process a pass's list belongs to (0 when the name does not say). */
function pidOf(file: string): number {
  return Number(/\.(\d+)-[0-9a-f]+$/.exec(file)?.[1] ?? 0);
}

function alive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === 'EPERM';
  }
}

/** The replay journal of a work queue, in a private folder under `stateDir`. */
export function replayJournalPath(stateDir: string, queue: string): string {
  const user = process.getuid?.() ?? 'user';
  return join(stateDir, `amqp-concurrency-${user}`, `${encodeURIComponent(queue)}.replay.journal`);
}
