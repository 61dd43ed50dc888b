// The results pipe (ipc/protocol.ts RESULTS_FD) as a named pipe, where one can be made.
//
// A child writes one line per task to it, synchronously, before its next task starts: for
// tiny tasks that write is a syscall per task. What `stdio: 'pipe'` gives a child on Linux
// is a socket pair, and a write to a socket allocates a socket buffer and queues it; a
// write to a pipe copies into the pipe's page. On this project's bench machine a result
// line cost the writer 1.1 µs on the socket pair and 0.46 µs on a pipe, and the reader
// about half as much too (docs/benchmarks.md, "tenth pass").
//
// Node has no call that makes an anonymous pipe, so the master makes a FIFO with the
// system's `mkfifo` in a private directory, opens both ends, and unlinks it at once: what
// is left is an ordinary pipe that only the master and its child hold. The order, the
// blocking writes, the end of file when the child exits: all as with the socket pair.
//
// Where a FIFO cannot be made (no `mkfifo` on the PATH, a read-only temporary directory),
// the child gets the socket pair, as before: slower, never wrong. A command that is
// missing, not allowed or hung is not tried again in this process.
import { execFileSync } from 'node:child_process';
import { closeSync, constants, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The two ends of one results pipe: the master reads `readFd`; `writeFd` becomes the child's RESULTS_FD. */
export interface ResultsFifo {
  readFd: number;
  writeFd: number;
}

/** Commands that could not make a FIFO here: not tried again. */
const failed = new Set<string>();
/**
 * Failures that last: no such command, not allowed, a read-only or missing temporary
 * directory, a command that hung. Anything else (out of descriptors or space for a
 * moment, mkfifo's own failure) may pass, and the next child tries again.
 */
const LASTING = new Set(['ENOENT', 'EACCES', 'EPERM', 'EROFS', 'ETIMEDOUT']);
/** mkfifo takes a few ms; past this the master gives up on it rather than stall. */
const MKFIFO_TIMEOUT_MS = 1_000;

/**
 * A new results pipe, or undefined where none can be made (the caller then uses a socket
 * pair). The caller owns both descriptors: it closes `writeFd` once the child has it.
 */
export function openResultsFifo(mkfifo = 'mkfifo'): ResultsFifo | undefined {
  if (failed.has(mkfifo)) return undefined;
  let dir: string | undefined;
  let readFd: number | undefined;
  try {
    // 0700 directory and a 0600 FIFO: no other user can open it in the moment it has a name.
    dir = mkdtempSync(join(tmpdir(), 'amqp-concurrency-'));
    const path = join(dir, 'results');
    // Only PATH: the command sees none of the master's secrets (as workerEnv keeps them
    // from the workers).
    execFileSync(mkfifo, ['-m', '600', path], {
      stdio: 'ignore',
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin' },
      timeout: MKFIFO_TIMEOUT_MS,
    });
    // The read end first, without blocking: a FIFO's write end opens at once only while
    // a reader exists. The write end blocks on a full pipe, as the child's writes expect.
    readFd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
    const writeFd = openSync(path, constants.O_WRONLY);
    return { readFd, writeFd };
  } catch (err) {
    if (LASTING.has((err as NodeJS.ErrnoException).code ?? '')) failed.add(mkfifo);
    if (readFd !== undefined) closeSync(readFd);
    return undefined;
  } finally {
    // The name goes; the open ends stay. A directory left behind is litter, not a fault.
    if (dir !== undefined)
      try {
        rmSync(dir, { recursive: true, force: true });
      } catch {}
  }
}
