// Breaks a crash loop on a classic queue. A message that stops the master is redelivered
// to the next master, which stops the same way, for ever: the broker cannot tell, since a
// classic queue counts no deliveries (a quorum queue does, and our x-delivery-limit ends
// the loop there). So the master's last-resort handler writes down the message that was
// being handled when it died, synchronously, in a small file that outlives the process,
// and a master that sees that message redelivered after `limit` such deaths dead-letters
// it as crashed instead of handling it again.
//
// A key is a digest of the message id and the body: never the body itself, which may
// carry customer data. The file holds a few entries at most; reading it is done once, at
// start-up, and it is written only when a master dies or a suspect is settled.
import { createHash } from 'node:crypto';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { privateFolder } from '../util/private-folder.ts';

/** Deaths of the master while handling one message before it is dead-lettered as crashed. */
export const CRASH_LIMIT = 3;

/**
 * The crash journal's file: per queue, in a folder of this user's own under --state-dir
 * (the temporary folder by default, which survives a restart of the process and of its
 * container, not a new container: see README).
 */
export function crashJournalPath(stateDir: string, queue: string): string {
  const user = process.getuid?.() ?? 'user';
  return join(stateDir, `amqp-concurrency-${user}`, `${encodeURIComponent(queue)}.crashes.json`);
}

/** How many suspects the file keeps: the newest (a crash loop is one message, or a few). */
const MAX_ENTRIES = 100;

export function crashKey(messageId: string | undefined, body: Buffer): string {
  return createHash('sha256')
    .update(messageId ?? '')
    .update('\u0000')
    .update(body)
    .digest('hex')
    .slice(0, 32);
}

export class CrashJournal {
  readonly path: string;
  readonly limit: number;
  /** Why the journal cannot be kept (it then breaks no crash loop), or undefined. */
  readonly problem: string | undefined;
  #counts: Map<string, number>;

  constructor(path: string, limit: number) {
    this.path = path;
    this.limit = limit;
    this.#counts = new Map();
    this.problem = privateFolder(dirname(path));
    if (this.problem !== undefined) return;
    try {
      const saved = JSON.parse(readFileSync(path, 'utf8')) as unknown;
      if (typeof saved === 'object' && saved !== null)
        for (const [key, n] of Object.entries(saved)) if (typeof n === 'number') this.#counts.set(key, n);
    } catch {
      // No journal yet, or an unreadable one: start empty.
    }
  }

  /** Whether any message is suspected at all: when not, nothing needs a digest. */
  get empty(): boolean {
    return this.#counts.size === 0;
  }

  /** How many times the master died while handling the message with this key. */
  deaths(key: string): number {
    return this.#counts.get(key) ?? 0;
  }

  /** The master is dying while handling these messages: write them down, now (synchronously). */
  suspect(...keys: string[]): void {
    if (keys.length === 0) return;
    for (const key of keys) {
      const deaths = this.deaths(key);
      this.#counts.delete(key); // set again below: the newest entry
      this.#counts.set(key, deaths + 1);
    }
    while (this.#counts.size > MAX_ENTRIES) this.#counts.delete(this.#counts.keys().next().value as string);
    this.#save();
  }

  /** The message is settled at last: forget it. */
  forget(key: string): void {
    if (this.#counts.delete(key)) this.#save();
  }

  #save(): void {
    if (this.problem !== undefined) return;
    try {
      const temporary = `${this.path}.${process.pid}`;
      writeFileSync(temporary, JSON.stringify(Object.fromEntries(this.#counts)), { mode: 0o600 });
      renameSync(temporary, this.path);
    } catch {
      // A journal we cannot write breaks no loop but must not stop anything either.
    }
  }
}
