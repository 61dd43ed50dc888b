// Which dead letters a pass acts on (README "Dead letters"): the filter as the CLI's flags
// and the HTTP routes give it, checked alike with one line for what is wrong, and the
// match of one dead letter against it. Pure; the passes themselves are dead-letters.ts.
import type { DeadLetter } from './dead-letters.ts';

export interface DeadFilter {
  /** Only this `x-error-kind` (failed, timeout, crashed, rejected, cancelled). */
  kind?: string;
  /** Only this func (read from the body). */
  func?: string;
  /** At most this many matching dead letters. */
  limit?: number;
  /** Only those that died at least this many ms ago. */
  olderThanMs?: number;
}

export function matches(letter: DeadLetter, filter: DeadFilter, now: number): boolean {
  if (filter.kind !== undefined && letter.kind !== filter.kind) return false;
  if (filter.func !== undefined && letter.func !== filter.func) return false;
  if (
    filter.olderThanMs !== undefined &&
    (letter.diedAt === undefined || now - letter.diedAt < filter.olderThanMs)
  )
    return false;
  return true;
}

const KINDS = ['failed', 'timeout', 'crashed', 'rejected', 'cancelled'];

/** The filter of the CLI's flags or the HTTP body, checked alike: one line for what is wrong. */
export function parseDeadFilter(raw: {
  kind?: unknown;
  func?: unknown;
  limit?: unknown;
  olderThan?: unknown;
}): DeadFilter | string {
  const filter: DeadFilter = {};
  if (raw.kind !== undefined) {
    if (typeof raw.kind !== 'string' || !KINDS.includes(raw.kind))
      return `--kind: must be one of ${KINDS.join(', ')} (got ${JSON.stringify(raw.kind)})`;
    filter.kind = raw.kind;
  }
  if (raw.func !== undefined) {
    if (typeof raw.func !== 'string' || raw.func === '') return '--func: must be a function name';
    filter.func = raw.func;
  }
  if (raw.limit !== undefined) {
    const n = Number(raw.limit);
    if (!Number.isSafeInteger(n) || n < 1 || (typeof raw.limit === 'string' && !/^\d+$/.test(raw.limit)))
      return `--limit: must be a whole number of at least 1 (got ${JSON.stringify(raw.limit)})`;
    filter.limit = n;
  }
  if (raw.olderThan !== undefined) {
    const ms = typeof raw.olderThan === 'string' ? parseDuration(raw.olderThan) : undefined;
    if (ms === undefined)
      return `--older-than: must be a duration such as 45s, 30m, 2h or 7d (got ${JSON.stringify(raw.olderThan)})`;
    filter.olderThanMs = ms;
  }
  return filter;
}

/** `2d`, `3h`, `30m`, `45s` or `500ms` as ms; undefined when it is none of these. */
export function parseDuration(text: string): number | undefined {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(text.trim());
  if (match === null) return undefined;
  const unit = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }[match[2] as 'ms'];
  return Math.round(Number(match[1]) * unit);
}
