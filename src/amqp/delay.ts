// Delayed messages without a broker plugin (README "Delayed tasks"): a message with the
// header `x-delay: <ms>` (the delayed-message plugin's name for it) is never held unacked
// here while it waits. It goes, as a confirmed copy stamped `x-delay-until`, to a TTL
// queue that dead-letters it back to the work queue when its TTL is over; back, it goes
// on to the next queue until its time has come, and then it runs.
//
// The TTL queues are a fixed ladder, each four times the last (100 ms to about 7 h): a
// message takes the longest step that does not pass its time, so a wait of any length is
// a few steps per power of four, and a TTL queue holds messages of one TTL only (a queue
// expires messages from its head: mixed TTLs would wait behind each other). A wait shorter
// than the first step takes the first step: a message never runs early, and runs at most
// that step late (plus the broker's time per step).

/** The TTL of each delay queue, in ms. */
export const DELAY_STEPS_MS: readonly number[] = Array.from({ length: 10 }, (_, k) => 100 * 4 ** k);

/** The longest delay asked for that is taken (the delayed-message plugin's own bound, about 49 days). */
export const MAX_DELAY_MS = 2 ** 32 - 1;

export function delayQueueName(queue: string, stepMs: number): string {
  return `${queue}.delay.${stepMs}ms`;
}

/** The step a message that may run in `remainingMs` takes next: the longest that does not pass it. */
export function delayStep(remainingMs: number): number {
  let step = DELAY_STEPS_MS[0] as number;
  for (const ms of DELAY_STEPS_MS) if (ms <= remainingMs) step = ms;
  return step;
}
