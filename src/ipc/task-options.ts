// Per-task options (README "Per-task options"): a task function may carry `fn.options`,
// named after the service's flags, that replace the flags' values for that function. The
// child reads them when it loads the task module, checks them here and sends them to the
// master in its `ready` frame; the master checks them here again (it trusts no frame),
// and applies them: the time limit and kill grace in the pool's slot, the concurrency and
// rate limits in the scheduler, the retries in the dispatcher.
//
// Declared in seconds, as the flags are; carried in milliseconds.

/** What a task module declares: `resize.options = { timeout: 120, maxRetries: 5 }`. */
export interface TaskOptions {
  /** Seconds a run may take before its AbortSignal fires (--worker-timeout). */
  timeout?: number;
  /** Seconds between the signal and the kill (--kill-grace; 0: kill at once). */
  killGrace?: number;
  /** Retries after a failure, timeout or crash (--max-retries). */
  maxRetries?: number;
  /** Seconds before the first retry, doubled for each next one (--retry-delay). */
  retryDelay?: number;
  /** The longest wait between retries, in seconds (--retry-delay-max). */
  retryDelayMax?: number;
  /** At most this many runs of the function at once in this service. */
  concurrency?: number;
  /** At most this many starts of the function per second, minute or hour in this service: `'5/s'`, `'100/m'`, `'1/h'`. */
  rateLimit?: `${number}/${'s' | 'm' | 'h'}`;
}

/** A rate limit: `count` starts per `perMs`. */
export interface RateLimit {
  count: number;
  perMs: number;
}

/** The options as they cross to the master and apply there: durations in ms, the rate parsed. */
export interface TaskLimits {
  timeoutMs?: number;
  killGraceMs?: number;
  maxRetries?: number;
  retryDelayMs?: number;
  retryDelayMaxMs?: number;
  concurrency?: number;
  rate?: RateLimit;
}

/** Bounds as the flags' (config/options.ts): a day of run time, a thousand retries. */
const MAX_SECONDS = 86_400;
const MAX_RETRIES = 1_000;
const MAX_CONCURRENCY = 100_000;
/** The most starts a rate may allow per window: the scheduler keeps that many start times. */
const MAX_RATE_COUNT = 100_000;
const PER: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000 };

const NAMES = [
  'timeout',
  'killGrace',
  'maxRetries',
  'retryDelay',
  'retryDelayMax',
  'concurrency',
  'rateLimit',
] as const;

/** The durations, declared in seconds as the flags are, carried in ms; the least each may be, in ms. */
const DURATIONS = [
  ['timeout', 'timeoutMs', 1],
  ['killGrace', 'killGraceMs', 0],
  ['retryDelay', 'retryDelayMs', 0],
  ['retryDelayMax', 'retryDelayMaxMs', 0],
] as const;

/** The whole-number options, with their bounds. */
const COUNTS = [
  ['maxRetries', 0, MAX_RETRIES],
  ['concurrency', 1, MAX_CONCURRENCY],
] as const;

export type CheckedLimits = { ok: true; value: TaskLimits } | { ok: false; problem: string };

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function seconds(value: unknown, min: number): number | undefined {
  return typeof value === 'number' && Number.isFinite(value) && value >= min && value <= MAX_SECONDS
    ? value
    : undefined;
}

function whole(value: unknown, min: number, max: number): number | undefined {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= min && value <= max
    ? value
    : undefined;
}

/** `'5/s'` as a RateLimit; undefined when it is not N/s, N/m or N/h with N a whole number from 1 to MAX_RATE_COUNT. */
export function parseRateLimit(value: unknown): RateLimit | undefined {
  if (typeof value !== 'string') return undefined;
  const match = /^(\d{1,9})\/([smh])$/.exec(value.trim());
  if (match === null) return undefined;
  const count = Number(match[1]);
  return count >= 1 && count <= MAX_RATE_COUNT
    ? { count, perMs: PER[match[2] as string] as number }
    : undefined;
}

/** A RateLimit as it is declared (`'5/s'`): parseRateLimit's inverse. */
export function formatRateLimit(rate: RateLimit): string {
  const unit = Object.keys(PER).find((u) => PER[u] === rate.perMs) ?? `${rate.perMs}ms`;
  return `${rate.count}/${unit}`;
}

/** What a value is, said without quoting it (it is the task author's, but may be anything). */
function kindOf(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string') return value.length <= 20 ? JSON.stringify(value) : 'a long string';
  if (typeof value === 'number') return String(value);
  return typeof value;
}

/**
 * Checks the options a task function declares. The problem, when there is one, names the
 * function and the option, in one line: it becomes the start-up error (exit code 2).
 */
export function checkTaskOptions(func: string, declared: unknown): CheckedLimits {
  const bad = (problem: string): CheckedLimits => ({
    ok: false,
    problem: `task ${JSON.stringify(func)}: ${problem}`,
  });
  if (!isObject(declared)) return bad(`options must be an object (got ${kindOf(declared)})`);
  const limits: TaskLimits = {};
  for (const name of Object.keys(declared)) {
    if (!(NAMES as readonly string[]).includes(name))
      return bad(`unknown option ${JSON.stringify(name)} (known: ${NAMES.join(', ')})`);
  }
  const get = (name: (typeof NAMES)[number]) => (Object.hasOwn(declared, name) ? declared[name] : undefined);
  for (const [name, into, minMs] of DURATIONS) {
    const value = get(name);
    if (value === undefined) continue;
    const s = seconds(value, minMs > 0 ? Number.MIN_VALUE : 0);
    if (s === undefined) {
      const what = minMs > 0 ? `over 0 and at most ${MAX_SECONDS}` : `from 0 to ${MAX_SECONDS}`;
      return bad(`option ${name} must be seconds, ${what} (got ${kindOf(value)})`);
    }
    // A time limit rounds to 1 ms at least: 0 would mean none.
    limits[into] = Math.max(minMs, Math.round(s * 1000));
  }
  for (const [name, min, max] of COUNTS) {
    const value = get(name);
    if (value === undefined) continue;
    const n = whole(value, min, max);
    if (n === undefined)
      return bad(`option ${name} must be a whole number from ${min} to ${max} (got ${kindOf(value)})`);
    limits[name] = n;
  }
  const rateLimit = get('rateLimit');
  if (rateLimit !== undefined) {
    const rate = parseRateLimit(rateLimit);
    if (rate === undefined)
      return bad(
        `option rateLimit must be 'N/s', 'N/m' or 'N/h' with N from 1 to ${MAX_RATE_COUNT} (got ${kindOf(rateLimit)})`,
      );
    limits.rate = rate;
  }
  return { ok: true, value: limits };
}

/**
 * The limits of a ready frame, as the master takes them: an object of function names to
 * limits already in milliseconds. Checked field by field (the child may be anything);
 * what is wrong is said without quoting it.
 */
export function checkLimitsFrame(
  value: unknown,
): { ok: true; value: Record<string, TaskLimits> } | { ok: false; problem: string } {
  if (value === undefined) return { ok: true, value: {} };
  if (!isObject(value)) return { ok: false, problem: 'a ready frame whose limits is not an object' };
  const out: Record<string, TaskLimits> = Object.create(null);
  for (const func of Object.keys(value)) {
    const limits = value[func];
    if (!isObject(limits)) return { ok: false, problem: 'a ready frame with limits that are not an object' };
    const checked: TaskLimits = {};
    const fits = (name: keyof TaskLimits, min: number, max: number): boolean => {
      const v = limits[name];
      if (v === undefined) return true;
      const n = whole(v, min, max);
      if (n === undefined) return false;
      (checked as Record<string, unknown>)[name] = n;
      return true;
    };
    let rateOk = true;
    if (limits.rate !== undefined) {
      const rate = limits.rate;
      const n = isObject(rate) ? whole(rate.count, 1, MAX_RATE_COUNT) : undefined;
      const per = isObject(rate) ? rate.perMs : undefined;
      if (n === undefined || !Object.values(PER).includes(per as number)) rateOk = false;
      else checked.rate = { count: n, perMs: per as number };
    }
    if (
      !DURATIONS.every(([, into, minMs]) => fits(into, minMs, MAX_SECONDS * 1000)) ||
      !COUNTS.every(([name, min, max]) => fits(name, min, max)) ||
      !rateOk
    )
      return { ok: false, problem: 'a ready frame with limits out of their bounds' };
    out[func] = checked;
  }
  return { ok: true, value: out };
}
