// JSON that keeps every integer exact, on both sides of the pool. JavaScript numbers hold
// integers exactly only up to 2^53; a producer in Python (or any language with big
// integers) sends larger ones, and JSON.parse would round 12345678901234567890 to
// 12345678901234567000 without a word. Here an integer literal past 2^53 becomes a BigInt,
// and a BigInt is written back as its digits. A number JSON.parse cannot hold at all
// (1e400 is Infinity) is refused rather than turned into null.
//
// The slow path (a reviver that reads each number's source text) runs only for a text
// with a long run of digits or a large exponent: a plain body is one JSON.parse.

/** A long run of digits (an integer that may pass 2^53) or a 3-digit exponent (a number that may overflow). */
const MAY_BE_INEXACT = /\d{16}|[eE][+-]?\d{3}/;

export type ExactParse = { ok: true; value: unknown; bigints: boolean } | { ok: false; reason: string };

/** Parses JSON text (already known to be valid syntax or not: JSON.parse's error propagates). */
export function parseExact(text: string): ExactParse {
  if (!MAY_BE_INEXACT.test(text)) return { ok: true, value: JSON.parse(text), bigints: false };
  let bigints = false;
  let overflow = false;
  const value = JSON.parse(text, function revive(
    this: unknown,
    _key: string,
    value: unknown,
    context?: { source?: string },
  ) {
    if (typeof value !== 'number') return value;
    if (!Number.isFinite(value)) {
      overflow = true;
      return value;
    }
    const source = context?.source;
    if (!Number.isSafeInteger(value) && source !== undefined && /^-?\d+$/.test(source)) {
      bigints = true;
      return BigInt(source);
    }
    return value;
  } as (this: unknown, key: string, value: unknown) => unknown);
  if (overflow) return { ok: false, reason: 'a number in the body is too large to be held (past ±1.8e308)' };
  return { ok: true, value, bigints };
}

const rawJSON = (JSON as unknown as { rawJSON: (text: string) => unknown }).rawJSON;

/** JSON.stringify, with a BigInt written as its exact digits (the replacer only when one is there). */
export function stringifyExact(value: unknown): string | undefined {
  try {
    return JSON.stringify(value);
  } catch (err) {
    if (!(err instanceof TypeError && /BigInt/.test(err.message))) throw err;
    return JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? rawJSON(v.toString()) : v));
  }
}
