// How tasks cross from a slot to its child: one `run` frame for the tasks of one
// dispatch, after those the child holds, and what happens when that fails. Kept apart
// from the slot's process life (slot.ts) because its two failure paths are about the
// tasks, not the process: a child that can no longer be told anything (it is exiting)
// gives the tasks back, unrun, to run elsewhere; a task that cannot be serialised (nested
// past JSON.stringify's stack) ends alone, as crashed, and never takes the others or the
// master with it. The slot owns the held list; this only adds to it and takes back what
// never reached the child.
import type { Logger } from 'pino';
import { serializeError, taskFailure } from '../errors.ts';
import type { TaskLimits } from '../ipc/task-options.ts';
import type { Child } from './child.ts';
import type { HeldJobs } from './held-jobs.ts';
import type { Job } from './job.ts';

export interface HandOverParts {
  child: Pick<Child, 'send'>;
  /** The slot's held tasks: handed tasks join it, and leave it again when they never arrive. */
  jobs: HeldJobs;
  /** The options the task code declares, by function (known once the child is ready). */
  limits: () => Readonly<Record<string, TaskLimits>>;
  taskTimeoutMs: number;
  rssEachTask: boolean;
  maxResultBytes: number;
  log: Logger;
  /** Tasks that never reached the child, to run elsewhere (in their order). */
  returned: (jobs: Job[]) => void;
}

export class HandOver {
  readonly #parts: HandOverParts;

  constructor(parts: HandOverParts) {
    this.#parts = parts;
  }

  /** Hands tasks over, in order, after those held. */
  hand(jobs: Job[]): void {
    this.#parts.jobs.add(jobs);
    try {
      if (!this.#send(jobs)) this.#undeliverable(jobs);
    } catch {
      // One of them cannot be serialised: send them one by one, so that only the
      // unsendable ones end, and nothing else is disturbed.
      for (const job of jobs) {
        try {
          if (!this.#send([job])) this.#undeliverable([job]);
        } catch (err) {
          this.#unsendable(job, err);
        }
      }
    }
  }

  #send(jobs: Job[]): boolean {
    const { child, taskTimeoutMs, rssEachTask, maxResultBytes } = this.#parts;
    const limits = this.#parts.limits();
    const tasks = jobs.map((job) => job.frame(limits[job.request.func]?.timeoutMs));
    return child.send({ type: 'run', tasks, timeoutMs: taskTimeoutMs, rssEachTask, maxResultBytes });
  }

  /** The child can no longer be told anything (it is exiting): these were never sent, they go back. */
  #undeliverable(jobs: Job[]): void {
    const back = new Set(jobs);
    this.#parts.jobs.remove((j) => back.has(j));
    for (const job of jobs) {
      clearTimeout(job.timer);
      job.timer = undefined;
      job.startedAt = 0;
    }
    // Not from inside the dispatch that handed them over: after it.
    queueMicrotask(() => this.#parts.returned(jobs));
  }

  /** A task that cannot reach the child ends alone, as crashed: never the process. */
  #unsendable(job: Job, err: unknown): void {
    this.#parts.jobs.remove((j) => j === job);
    const cause = serializeError(err);
    this.#parts.log.error(
      { taskId: job.taskId, func: job.request.func, err },
      'a task could not be handed to its worker',
    );
    job.end({
      outcome: 'crashed',
      error: taskFailure.dispatch('the task could not be handed to a worker', cause),
      durationMs: 0,
    });
  }
}
