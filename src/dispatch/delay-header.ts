// When a message may run, from its headers (README "Delayed tasks"): `x-delay: <ms>` as a
// producer sets it (the delayed-message plugin's header), counted from its arrival here,
// and `x-delay-until` as the service stamps it on the copy it sends through the delay
// queues. Pure, so that every case is a unit test.
import { MAX_DELAY_MS } from '../amqp/delay.ts';
import { DELAY_UNTIL_HEADER, ownHeader } from './outcome.ts';

/** A number of ms from a header: a number, or a string of digits (some clients send text). */
function msOf(value: unknown): number | undefined {
  if (typeof value === 'number') return value;
  if (typeof value === 'bigint') return Number(value);
  if (typeof value === 'string' && /^-?\d{1,16}$/.test(value.trim())) return Number(value);
  return undefined;
}

/**
 * Undefined when the message may run now; else the time (ms since the epoch) it may run;
 * or, for a delay that cannot be honoured, why (the message is then rejected).
 */
export function delayOf(
  headers: Record<string, unknown> | undefined,
  now: number,
): number | string | undefined {
  if (headers === undefined) return undefined;
  const stamped = ownHeader(headers, DELAY_UNTIL_HEADER);
  if (stamped !== undefined) {
    const until = msOf(stamped);
    if (until === undefined || !Number.isFinite(until))
      return `${DELAY_UNTIL_HEADER} is not a time in ms since the epoch`;
    if (until <= now) return undefined;
    if (until - now > MAX_DELAY_MS) return `${DELAY_UNTIL_HEADER} is more than ${MAX_DELAY_MS} ms away`;
    return until;
  }
  const asked = ownHeader(headers, 'x-delay');
  if (asked === undefined) return undefined;
  const ms = msOf(asked);
  if (ms === undefined || !Number.isFinite(ms) || ms > MAX_DELAY_MS)
    return `x-delay must be a number of milliseconds up to ${MAX_DELAY_MS}`;
  // The plugin treats a delay of 0 or less as none.
  return ms <= 0 ? undefined : now + Math.ceil(ms);
}
