// What the subcommands (publish, status) share: their output and their argv splitting,
// on the one tokeniser (util/argv.ts) the service's options use too. A subcommand returns
// its exit code and throws ERR_CONFIG for bad usage (exit 2); main.ts owns the process.
import { tokenize, usage } from '../util/argv.ts';

export { usage };

/** Where a subcommand writes; the CLI passes stdout and stderr, tests pass buffers. */
export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
}

export interface SplitArgs {
  /** The options given, in order, by the name they were given with (`--amqp_url` stays so). */
  flags: [name: string, value: string][];
  /** Everything else, in order; everything after `--` too. */
  words: string[];
  help: boolean;
}

/** A subcommand's argv: `valued` options take a value, `booleans` none; `--help`/`-h` always. */
export function splitArgs(
  argv: readonly string[],
  valued: readonly string[],
  booleans: readonly string[] = [],
): SplitArgs {
  const flags: [string, string][] = [];
  const words: string[] = [];
  let help = false;
  const spec = {
    valued: new Map(valued.map((name) => [name, 'a value'])),
    booleans: new Set([...booleans, '--help']),
    shorts: new Map([['-h', '--help']]),
  };
  for (const token of tokenize(argv, spec)) {
    if (token.kind === 'terminator') words.push(...token.rest);
    else if (token.kind === 'word') words.push(token.text);
    else if (token.kind === 'flag') {
      if (token.name === '--help') help = true;
      else flags.push([token.name, 'true']);
    } else flags.push([token.name, token.value]);
  }
  return { flags, words, help };
}

/** The last value given for any of `names` (a later flag wins, as in the service's parser). */
export function lastFlag(flags: SplitArgs['flags'], ...names: string[]): string | undefined {
  return flags.findLast(([name]) => names.includes(name))?.[1];
}
