// The message contract (README "The message"): which bodies name a runnable task, and why the others
// are rejected. Pure: it sees bytes and the set of callable names, nothing else.
import { type ExactParse, parseExact } from '../ipc/exact-json.ts';

export interface TaskCall {
  func: string;
  args: unknown[];
  /** Present only when it has keys: then it is passed as the last argument. */
  kwargs: Record<string, unknown> | undefined;
  /** Integers past 2^53 are in it, as BigInt: it crosses to the child as exact JSON. */
  bigints: boolean;
}

export type ParsedMessage =
  | { ok: true; call: TaskCall }
  /** `func` is the requested name when it was a string, for logs; metrics use <unknown>. */
  | { ok: false; reason: string; func: string | undefined };

/**
 * How deep arrays and objects may nest in a body. JSON.parse copes with any depth, but
 * every later step that walks the value recursively (the IPC to the child, the task's
 * own code) overflows its stack somewhere past a few thousand: a 12 KB body could stop
 * the master. Real task arguments are a handful of levels deep.
 */
export const MAX_DEPTH = 64;

/** Whether arrays and objects in `value` nest deeper than `limit` (iterative: no stack to overflow). */
export function depthExceeds(value: unknown, limit: number): boolean {
  const stack: [unknown, number][] = [[value, 1]];
  for (let item = stack.pop(); item !== undefined; item = stack.pop()) {
    const [node, depth] = item;
    if (typeof node !== 'object' || node === null) continue;
    if (depth > limit) return true;
    for (const child of Array.isArray(node) ? node : Object.values(node)) {
      if (typeof child === 'object' && child !== null) stack.push([child, depth + 1]);
    }
  }
  return false;
}

/**
 * Why `text` is not JSON, and where, without quoting it. The parser's own message says
 * where only for some errors; otherwise the shortest prefix that the parser refuses for
 * a reason other than its end ends at the offending character (a few parses, on the
 * failure path only).
 */
export function notJsonReason(text: string): string {
  if (text.trim() === '') return 'body is not JSON: it is empty';
  /** Where parsing `text.slice(0, length)` fails before its end, -1 if it does not. */
  const failure = (length: number): number => {
    try {
      JSON.parse(text.slice(0, length));
      return -1;
    } catch (err) {
      const message = (err as Error).message;
      if (/Unexpected end of JSON input|Unterminated string/.test(message)) return -1;
      const at = /at position (\d+)/.exec(message)?.[1];
      if (at === undefined) return length; // somewhere before the end; narrowed below
      return Number(at) >= length ? -1 : Number(at);
    }
  };
  const whole = failure(text.length);
  if (whole === -1) return 'body is not JSON: it ends before the value does';
  let at = whole;
  if (at === text.length) {
    // No position given: the shortest prefix that fails before its end ends at the culprit.
    let lo = 1;
    let hi = text.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (failure(mid) !== -1) hi = mid;
      else lo = mid + 1;
    }
    at = lo - 1;
  }
  return `body is not JSON: unexpected character at byte ${Buffer.byteLength(text.slice(0, at))}`;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function parseTaskMessage(
  body: Buffer,
  callable: ReadonlySet<string>,
  maxBytes: number,
): ParsedMessage {
  if (body.length > maxBytes) {
    return {
      ok: false,
      reason: `body is ${body.length} bytes, over the limit of ${maxBytes}`,
      func: undefined,
    };
  }
  const text = body.toString('utf8');
  let parsed: ExactParse;
  try {
    parsed = parseExact(text);
  } catch {
    // Never the parser's message: it quotes the body, and bodies carry customer data.
    return { ok: false, reason: notJsonReason(text), func: undefined };
  }
  if (!parsed.ok) return { ok: false, reason: parsed.reason, func: undefined };
  const value = parsed.value;
  // A body shorter than twice the limit cannot nest past it: skip the walk.
  if (body.length > 2 * MAX_DEPTH && depthExceeds(value, MAX_DEPTH)) {
    return {
      ok: false,
      reason: `body is nested deeper than ${MAX_DEPTH} levels`,
      func:
        typeof (value as { func?: unknown })?.func === 'string'
          ? (value as { func: string }).func
          : undefined,
    };
  }
  if (!isPlainObject(value)) {
    const what = value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value;
    return { ok: false, reason: `body must be a JSON object, got ${what}`, func: undefined };
  }
  const { func, args, kwargs } = value;
  if (func === undefined) return { ok: false, reason: 'func is missing', func: undefined };
  if (typeof func !== 'string') return { ok: false, reason: 'func must be a string', func: undefined };
  // Own exported functions only: the set comes from the child's `ready`, built from the
  // module's own function exports, so `constructor`, `__proto__`, `default`, `a.b` and
  // inherited names are never in it.
  if (!callable.has(func)) {
    return { ok: false, reason: `unknown func ${JSON.stringify(func.slice(0, 200))}`, func };
  }
  if (args !== undefined && !Array.isArray(args)) return { ok: false, reason: 'args must be an array', func };
  if (kwargs !== undefined && !isPlainObject(kwargs))
    return { ok: false, reason: 'kwargs must be an object', func };
  return {
    ok: true,
    call: {
      func,
      args: args ?? [],
      kwargs: kwargs !== undefined && Object.keys(kwargs).length > 0 ? kwargs : undefined,
      bigints: parsed.bigints,
    },
  };
}
