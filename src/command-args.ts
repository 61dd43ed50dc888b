// What the subcommands (publish, status) share: their output and their argv splitting.
// A subcommand returns its exit code and throws ERR_CONFIG for bad usage (exit 2);
// cli.ts owns the process.
import { ServiceError } from './errors.ts';

/** Where a subcommand writes; the CLI passes stdout and stderr, tests pass buffers. */
export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
}

/** Bad usage: one line, exit code 2. */
export function usage(message: string): never {
  throw new ServiceError('ERR_CONFIG', message);
}

export interface SplitArgs {
  /** The options given, in order, by the name they were given with (`--amqp_url` stays so). */
  flags: [name: string, value: string][];
  /** Everything else, in order; everything after `--` too. */
  words: string[];
  help: boolean;
}

/**
 * Splits `--flag value`, `--flag=value` and boolean `--flag` options from positional words.
 * Only `--` starts an option, so `-1` is a word; after a lone `--` everything is a word.
 */
export function splitArgs(
  argv: readonly string[],
  valued: readonly string[],
  booleans: readonly string[] = [],
): SplitArgs {
  const flags: [string, string][] = [];
  const words: string[] = [];
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--') {
      words.push(...argv.slice(i + 1));
      break;
    }
    if (arg === '--help' || arg === '-h') {
      help = true;
      continue;
    }
    if (!arg.startsWith('--')) {
      words.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    if (booleans.includes(name)) {
      if (eq !== -1) usage(`${name}: takes no value`);
      flags.push([name, 'true']);
    } else if (valued.includes(name)) {
      const value = eq === -1 ? argv[++i] : arg.slice(eq + 1);
      if (value === undefined) usage(`${name}: needs a value`);
      flags.push([name, value]);
    } else usage(`${name}: unknown option (see --help)`);
  }
  return { flags, words, help };
}

/** The last value given for any of `names` (a later flag wins, as in the service's parser). */
export function lastFlag(flags: SplitArgs['flags'], ...names: string[]): string | undefined {
  return flags.findLast(([name]) => names.includes(name))?.[1];
}
