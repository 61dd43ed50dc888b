// One forked worker process as the master sees it: the child, its boot (it says `ready`
// with the names it can run, or `load-failed`), its frames, its results and its exit. It
// holds no policy and no task state: those belong to its Slot (slot.ts).
//
// Nothing the child sends is taken at its word (ipc/validate.ts): a frame or a result line
// that breaks the protocol is reported as 'protocolError', and the child is killed.
//
// Each child leads a process group of its own (`detached`), so that a kill reaches what its
// task started (a `sleep 300` it spawned), and a signal to the master's group (Ctrl-C in a
// terminal) does not reach the workers, which the master stops itself. Its environment
// holds none of the master's secrets (workerEnv).
import { type ChildProcess, fork } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { closeSync } from 'node:fs';
import { Socket } from 'node:net';
import { finished, type Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { ServiceError } from '../errors.ts';
import type { CancelledMessage, MasterMessage, ReadyMessage, ResultLine } from '../ipc/protocol.ts';
import { checkChildMessage, resultLineProblem } from '../ipc/validate.ts';
import { openResultsFifo } from './results-fifo.ts';

/** The child's entry: forked by path, never imported (the pool and the worker meet only through ipc/). */
const CHILD_ENTRY = fileURLToPath(new URL('../worker/entry.ts', import.meta.url));

/** Variables a worker never sees: the broker's password and the operator's token. */
const SECRET_NAMES = new Set(['AMQP_URL', 'SHUTDOWN_TOKEN']);
const SECRET_WORDS = /TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|PRIVATE_KEY|API_KEY/i;

/**
 * The master's environment less its secrets: AMQP_URL, SHUTDOWN_TOKEN and any variable
 * whose name says token, password or secret. The task module's own settings pass.
 */
export function workerEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const kept: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(env)) {
    if (SECRET_NAMES.has(name) || SECRET_WORDS.test(name)) continue;
    kept[name] = value;
  }
  return kept;
}

type ChildEvents = {
  /** Results in the order the tasks ran: all those one read of the results pipe brought. */
  done: [results: ResultLine[]];
  cancelled: [message: CancelledMessage];
  /** The child broke the protocol; it is being killed. */
  protocolError: [problem: string];
  exit: [code: number | null, signal: NodeJS.Signals | null];
};

export interface ChildOptions {
  moduleUrl: string;
  bootTimeoutMs: number;
  /** The longest result line accepted; a longer one is a broken protocol. */
  maxLineBytes: number;
}

export class Child extends EventEmitter<ChildEvents> {
  readonly pid: number | undefined;
  /** The child's resident memory as it last reported it (after a task; see task-runner.ts for how often). */
  rssBytes: number | undefined;
  /** Resolves with the names the module exports, and their options, once ready; rejects if it fails to boot. */
  readonly ready: Promise<ReadyMessage>;
  /** Resolves once the process has exited (a kill is awaited through this). */
  readonly exited: Promise<void>;
  readonly #child: ChildProcess | undefined;
  readonly #maxLineBytes: number;
  #exitSeen = false;
  #broken = false;

  constructor(opts: ChildOptions) {
    super();
    const { moduleUrl, bootTimeoutMs } = opts;
    this.#maxLineBytes = opts.maxLineBytes;
    let booting = true;
    let resolveReady: (ready: ReadyMessage) => void = () => {};
    let rejectReady: (err: ServiceError) => void = () => {};
    this.ready = new Promise<ReadyMessage>((resolve, reject) => {
      resolveReady = resolve;
      rejectReady = reject;
    });
    // Boot failures are handled through `ready` by whoever awaits it; never unhandled.
    this.ready.catch(() => {});
    this.exited = new Promise((resolve) => this.once('exit', () => resolve()));
    const fail = (err: ServiceError) => {
      if (!booting) return;
      clearTimeout(timer);
      booting = false;
      // A child that failed to start is never reused.
      this.kill();
      rejectReady(err);
    };
    const timer = setTimeout(() => {
      fail(new ServiceError('ERR_WORKER_BOOT', `a worker did not become ready in ${bootTimeoutMs} ms`));
    }, bootTimeoutMs);

    let child: ChildProcess | undefined;
    // fd 4 (RESULTS_FD): the results pipe. A FIFO where one can be made, else the socket
    // pair Node makes for 'pipe' (results-fifo.ts says why).
    const fifo = openResultsFifo();
    try {
      child = fork(CHILD_ENTRY, [moduleUrl], {
        // The master's own flags (a test runner's, an inspector) are not the children's.
        execArgv: [],
        env: workerEnv(process.env),
        serialization: 'json',
        detached: true,
        stdio: ['ignore', 'inherit', 'inherit', 'ipc', fifo?.writeFd ?? 'pipe'],
      });
    } catch (err) {
      // No process at all (out of file descriptors, say): this attempt ends, the master lives.
      child = undefined;
      if (fifo !== undefined) closeSync(fifo.readFd);
      queueMicrotask(() => {
        fail(
          new ServiceError('ERR_WORKER_SPAWN', `a worker could not be started: ${(err as Error).message}`),
        );
        this.#exited(null, null);
      });
    }
    // The child has its own copy of the write end (or none, if it failed to start). The
    // master's must close, or the pipe would never reach its end when the child exits.
    if (fifo !== undefined) closeSync(fifo.writeFd);
    this.#child = child;
    this.pid = child?.pid;
    if (child === undefined) return;

    // Absent when the spawn itself failed (out of file descriptors: then 'error' follows,
    // and `stdio` itself may be missing).
    const results =
      fifo === undefined
        ? (child.stdio?.[4] as Readable | null | undefined)
        : new Socket({ fd: fifo.readFd, readable: true, writable: false });
    if (results != null) this.#readResults(results);
    child.on('message', (raw: unknown) => {
      const checked = checkChildMessage(raw);
      if (!checked.ok) {
        this.breach(checked.problem);
        fail(
          new ServiceError(
            'ERR_WORKER_BOOT',
            `a worker broke the protocol while starting: ${checked.problem}`,
          ),
        );
        return;
      }
      const msg = checked.value;
      if (msg.type === 'ready') {
        if (!booting) return;
        clearTimeout(timer);
        booting = false;
        resolveReady(msg);
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
      } else this.emit('cancelled', msg);
    });
    child.on('exit', (code, signal) => {
      // The last results may still be in the pipe when the exit is seen: read them
      // first, or a task that finished just before its process died would count as
      // crashed. A grandchild holding the pipe open must not delay the exit for long.
      if (results == null) {
        exitedNow(code, signal);
        return;
      }
      const grace = setTimeout(() => exitedNow(code, signal), 1_000);
      finished(results, () => {
        clearTimeout(grace);
        exitedNow(code, signal);
      });
    });
    const exitedNow = (code: number | null, signal: NodeJS.Signals | null) => {
      results?.destroy();
      if (booting) {
        const how = signal ?? `exit code ${code}`;
        // Exiting before ready is exiting while the task module loads (a process.exit in
        // it, a native crash): the module's fault, said as such at start-up (exit 2).
        fail(
          new ServiceError(
            'ERR_TASK_MODULE',
            `a worker exited while loading the task module ${moduleUrl} (${how}); see its output above`,
          ),
        );
      }
      this.#exited(code, signal);
    };
    child.on('error', (err) => {
      // A spawn that failed has no pid and may never see 'exit': end it here. Other
      // errors (a kill or a send that failed) are followed by 'exit' or reported elsewhere.
      if (child.pid !== undefined) return;
      fail(new ServiceError('ERR_WORKER_SPAWN', `a worker could not be started: ${err.message}`));
      exitedNow(null, null);
    });
  }

  #exited(code: number | null, signal: NodeJS.Signals | null): void {
    if (this.#exitSeen) return;
    this.#exitSeen = true;
    this.reapGroup();
    this.emit('exit', code, signal);
  }

  /** Results are JSON lines; one read may end in the middle of one, kept for the next. */
  #readResults(results: Readable): void {
    let partial = '';
    results.setEncoding('utf8');
    results.on('data', (chunk: string) => {
      if (this.#broken) return;
      const end = chunk.lastIndexOf('\n');
      if (end === -1) {
        partial += chunk;
        if (partial.length > this.#maxLineBytes) this.breach('a result line longer than the result limit');
        return;
      }
      // JSON never holds a raw newline, so the lines of one read parse as one array.
      const lines = `[${partial}${chunk.slice(0, end).replaceAll('\n', ',')}]`;
      partial = chunk.slice(end + 1);
      let parsed: unknown[];
      try {
        parsed = JSON.parse(lines) as unknown[];
      } catch {
        this.breach('a result line that is not JSON');
        return;
      }
      for (let i = 0; i < parsed.length; i++) {
        const problem = resultLineProblem(parsed[i]);
        if (problem === undefined) continue;
        // What came before the bad line was written by the runner: it counts.
        if (i > 0) this.emit('done', parsed.slice(0, i) as ResultLine[]);
        this.breach(problem);
        return;
      }
      const batch = parsed as ResultLine[];
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

  /** The child broke the protocol: say so once, and kill it. */
  breach(problem: string): void {
    if (this.#broken) return;
    this.#broken = true;
    this.emit('protocolError', problem);
    this.kill();
  }

  /** Whether the IPC channel to the child is open: false once it is exiting or gone. */
  get connected(): boolean {
    return this.#child?.connected === true && !this.#broken;
  }

  /**
   * Sends a message; false when the child can no longer be told anything. Throws when the
   * message cannot be serialised (a value nested too deep for JSON.stringify's stack):
   * the caller decides what that means for the tasks in it.
   */
  send(message: MasterMessage): boolean {
    const child = this.#child;
    if (child === undefined || !this.connected) return false;
    child.send(message, undefined, {}, () => {});
    return true;
  }

  /** SIGKILL to the child's whole process group: what its task started goes with it. */
  kill(): void {
    const child = this.#child;
    if (child === undefined) return;
    const pid = child.pid;
    if (pid !== undefined) {
      try {
        process.kill(-pid, 'SIGKILL');
        return;
      } catch {
        // The group is gone already, or never formed: the child alone.
      }
    }
    child.kill('SIGKILL');
  }

  /** Asks an idle child to leave: it exits when its IPC channel closes. */
  retire(): void {
    if (this.#child?.connected) this.#child.disconnect();
    else this.kill();
  }

  /** Once the child has exited, what it left in its process group goes too (a task's own children). */
  reapGroup(): void {
    const pid = this.#child?.pid;
    if (pid === undefined) return;
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // Nothing left in it.
    }
  }
}
