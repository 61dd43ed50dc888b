// The message contract (SPEC §2): which bodies name a runnable task, and why the others
// are rejected. Pure: it sees bytes and the set of callable names, nothing else.

export interface TaskCall {
  func: string;
  args: unknown[];
  /** Present only when it has keys: then it is passed as the last argument. */
  kwargs: Record<string, unknown> | undefined;
}

export type ParsedMessage =
  | { ok: true; call: TaskCall }
  /** `func` is the requested name when it was a string, for logs; metrics use <unknown>. */
  | { ok: false; reason: string; func: string | undefined };

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
  let value: unknown;
  try {
    value = JSON.parse(body.toString('utf8'));
  } catch (err) {
    return { ok: false, reason: `body is not JSON: ${(err as Error).message}`, func: undefined };
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
    },
  };
}
