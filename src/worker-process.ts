// One forked worker process as the master sees it: the child, its boot (it says `ready`
// with the names it can run, or `load-failed`), its messages and its exit. It holds no
// policy and no task state: those belong to its PoolWorker (pool-worker.ts).
import { type ChildProcess, fork } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { finished, type Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { ServiceError } from './errors.ts';
import type { CancelledMessage, ChildMessage, MasterMessage, ResultLine } from './protocol.ts';

export const CHILD_SCRIPT = fileURLToPath(new URL('./child.ts', import.meta.url));

type WorkerEvents = {
  /** Results in the order the tasks ran: all those one read of the results pipe brought. */
  done: [results: ResultLine[]];
  cancelled: [message: CancelledMessage];
  exit: [code: number | null, signal: NodeJS.Signals | null];
};

export class WorkerProcess extends EventEmitter<WorkerEvents> {
  readonly child: ChildProcess;
  readonly pid: number | undefined;
  /** The child's resident memory as it last reported it (after a task; see child.ts for how often). */
  rssBytes: number | undefined;
  /** Resolves with the names the module exports once ready; rejects if it fails to boot. */
  readonly ready: Promise<string[]>;
  /** Resolves once the process has exited (a kill is awaited through this). */
  readonly exited: Promise<void>;

  constructor(moduleUrl: string, bootTimeoutMs: number, childScript = CHILD_SCRIPT) {
    super();
    let booting = true;
    this.child = fork(childScript, [moduleUrl], {
      // The master's own flags (a test runner's, an inspector) are not the children's.
      execArgv: [],
      serialization: 'json',
      // fd 4 (RESULTS_FD): the results pipe.
      stdio: ['ignore', 'inherit', 'inherit', 'ipc', 'pipe'],
    });
    this.pid = this.child.pid;
    // Absent only when the spawn itself failed; then 'exit' follows at once.
    const results = this.child.stdio[4] as Readable | null;
    if (results !== null) this.#readResults(results);
    this.exited = new Promise((resolve) => this.once('exit', () => resolve()));
    this.ready = new Promise<string[]>((resolve, reject) => {
      const timer = setTimeout(() => {
        fail(new ServiceError('ERR_WORKER_BOOT', `a worker did not become ready in ${bootTimeoutMs} ms`));
      }, bootTimeoutMs);
      const fail = (err: ServiceError) => {
        clearTimeout(timer);
        booting = false;
        // A child that failed to start is never reused.
        this.child.kill('SIGKILL');
        reject(err);
      };
      this.child.on('message', (msg: ChildMessage) => {
        if (msg.type === 'ready' && booting) {
          clearTimeout(timer);
          booting = false;
          resolve(msg.funcs);
        } else if (msg.type === 'load-failed') {
          fail(
            new ServiceError(
              'ERR_TASK_MODULE',
              `cannot load the task module ${moduleUrl}: ${msg.error.message}`,
              {
                cause: msg.error,
              },
            ),
          );
        } else if (msg.type === 'cancelled') {
          this.emit('cancelled', msg);
        }
      });
      this.child.on('exit', (code, signal) => {
        // The last results may still be in the pipe when the exit is seen: read them
        // first, or a task that finished just before its process died would count as
        // crashed. A grandchild holding the pipe open must not delay the exit for long.
        if (results === null) {
          exited(code, signal);
          return;
        }
        const grace = setTimeout(() => exited(code, signal), 1_000);
        finished(results, () => {
          clearTimeout(grace);
          exited(code, signal);
        });
      });
      let exitSeen = false;
      const exited = (code: number | null, signal: NodeJS.Signals | null) => {
        if (exitSeen) return;
        exitSeen = true;
        results?.destroy();
        if (booting) {
          const how = signal ?? `exit code ${code}`;
          fail(
            new ServiceError(
              'ERR_WORKER_BOOT',
              `a worker exited before it was ready (${how}); see its output above`,
            ),
          );
        }
        this.emit('exit', code, signal);
      };
    });
    // Boot failures are handled through `ready` by whoever awaits it; never unhandled.
    this.ready.catch(() => {});
    this.child.on('error', () => {
      // 'exit' follows a spawn or kill error; a failed send reports through its callback.
    });
  }

  /** Results are JSON lines; one read may end in the middle of one, kept for the next. */
  #readResults(results: Readable): void {
    let partial = '';
    results.setEncoding('utf8');
    results.on('data', (chunk: string) => {
      const end = chunk.lastIndexOf('\n');
      if (end === -1) {
        partial += chunk;
        return;
      }
      // JSON never holds a raw newline, so the lines of one read parse as one array.
      const lines = `[${partial}${chunk.slice(0, end).replaceAll('\n', ',')}]`;
      partial = chunk.slice(end + 1);
      let batch: ResultLine[];
      try {
        batch = JSON.parse(lines) as ResultLine[];
      } catch {
        // Only child.ts writes here; anything else means the child is not ours to trust.
        this.kill();
        return;
      }
      for (let i = batch.length - 1; i >= 0; i--) {
        const rss = (batch[i] as ResultLine).rssBytes;
        if (rss !== undefined) {
          this.rssBytes = rss;
          break;
        }
      }
      this.emit('done', batch);
    });
    results.on('error', () => {
      // A reset pipe ends like a closed one: the exit handling covers it.
    });
  }

  /**
   * Sends a message; false when the child can no longer be told anything. Throws when the
   * message cannot be serialised (a value nested too deep for JSON.stringify's stack):
   * the caller decides what that means for the tasks in it.
   */
  /** Whether the IPC channel to the child is open: false once it is exiting or gone. */
  get connected(): boolean {
    return this.child.connected;
  }

  send(message: MasterMessage): boolean {
    if (!this.child.connected) return false;
    this.child.send(message, undefined, {}, () => {});
    return true;
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }

  /** Asks an idle child to leave: it exits when its IPC channel closes. */
  retire(): void {
    if (this.child.connected) this.child.disconnect();
    else this.child.kill('SIGKILL');
  }
}
