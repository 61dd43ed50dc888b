// The one argv tokeniser, for the service's options and every subcommand's. `--name
// value`, `--name=value` and boolean `--name`; only `--` starts an option, so `-1` is a
// word; a lone `--` ends the options (the service refuses it, a subcommand takes what
// follows as words). A value that looks like an option (`--queue --workers 2`) is a
// missing value, not a value: write `--queue=--odd` for that.
//
// Tokens come one at a time, in argv order, and a bad one throws when it is reached: a
// caller that stops at `--help` never sees the errors after it, and the first error
// named is always the first in the line.
import { ServiceError } from '../errors.ts';

export interface ArgvSpec {
  /** Options that take a value: every name they may be written with, to its placeholder (`N`, `PATH`). */
  valued: ReadonlyMap<string, string>;
  /** Options that take none (`--wait`, `--help`). */
  booleans: ReadonlySet<string>;
  /** Short spellings of booleans (`-h` for `--help`). */
  shorts?: ReadonlyMap<string, string>;
}

export type ArgToken =
  | { kind: 'option'; name: string; value: string; inline: boolean }
  | { kind: 'flag'; name: string }
  | { kind: 'word'; text: string }
  /** A lone `--`: `rest` is everything after it, untouched; no token follows. */
  | { kind: 'terminator'; rest: string[] };

/** Bad usage: one line naming the argument, exit code 2. */
export function usage(message: string): never {
  throw new ServiceError('ERR_CONFIG', message);
}

export function* tokenize(argv: readonly string[], spec: ArgvSpec): Generator<ArgToken> {
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--') {
      yield { kind: 'terminator', rest: argv.slice(i + 1) };
      return;
    }
    const short = spec.shorts?.get(arg);
    if (short !== undefined) {
      yield { kind: 'flag', name: short };
      continue;
    }
    if (!arg.startsWith('--')) {
      yield { kind: 'word', text: arg };
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    if (spec.booleans.has(name)) {
      if (eq !== -1) usage(`${name}: takes no value`);
      yield { kind: 'flag', name };
      continue;
    }
    const placeholder = spec.valued.get(name);
    if (placeholder === undefined) usage(`${name}: unknown option (see --help)`);
    if (eq !== -1) {
      yield { kind: 'option', name, value: arg.slice(eq + 1), inline: true };
      continue;
    }
    const value = argv[i + 1];
    if (value === undefined || (value.startsWith('--') && value.length > 2))
      usage(`${name}: needs a value (${placeholder})`);
    i++;
    yield { kind: 'option', name, value, inline: false };
  }
}
