// The tasks one worker holds, in the order its child runs them: the first is running, the
// rest wait in the child behind it. Kept apart from the slot's process life (slot.ts)
// because its one rule is about order, not about the process: whenever a task becomes the
// first, its clock starts (`onRunning`), since the child starts the next task as it
// reports the one before. Every way a task leaves the list (its result, never sent, given
// back, the worker's exit) goes through here, so no path forgets that rule.
import type { Job } from './job.ts';

export class HeldJobs {
  #jobs: Job[] = [];
  readonly #onRunning: (job: Job) => void;

  constructor(onRunning: (job: Job) => void) {
    this.#onRunning = onRunning;
  }

  /** The running task, if any. */
  get running(): Job | undefined {
    return this.#jobs[0];
  }

  get count(): number {
    return this.#jobs.length;
  }

  find(match: (job: Job) => boolean): Job | undefined {
    return this.#jobs.find(match);
  }

  /** Whether every one of these task ids is held. */
  holdsAll(taskIds: readonly number[]): boolean {
    const held = new Set(this.#jobs.map((j) => j.taskId));
    return taskIds.every((id) => held.has(id));
  }

  /** Adds tasks after those held, in order; the first of them runs at once if none did. */
  add(jobs: readonly Job[]): void {
    const wasIdle = this.#jobs.length === 0;
    this.#jobs.push(...jobs);
    if (wasIdle && this.#jobs[0] !== undefined) this.#onRunning(this.#jobs[0]);
  }

  /**
   * The running task has reported its result: it leaves and the next one runs. Undefined,
   * and nothing changes, when `taskId` is not the running task's (results come in the
   * order the tasks ran: anything else is forged).
   */
  finish(taskId: number): Job | undefined {
    const job = this.#jobs[0];
    if (job === undefined || job.taskId !== taskId) return undefined;
    this.#jobs.shift();
    this.#next(true);
    return job;
  }

  /** Takes out the tasks `leaving` says (never sent, given back, unsendable), in order. */
  remove(leaving: (job: Job) => boolean): Job[] {
    const out: Job[] = [];
    const kept: Job[] = [];
    for (const job of this.#jobs) (leaving(job) ? out : kept).push(job);
    if (out.length === 0) return out;
    const firstLeft = out[0] === this.#jobs[0];
    this.#jobs = kept;
    this.#next(firstLeft);
    return out;
  }

  /** Everything held, emptied (the worker has exited): the running task first. */
  takeAll(): Job[] {
    const all = this.#jobs;
    this.#jobs = [];
    return all;
  }

  #next(firstLeft: boolean): void {
    const next = this.#jobs[0];
    if (firstLeft && next !== undefined) this.#onRunning(next);
  }
}
