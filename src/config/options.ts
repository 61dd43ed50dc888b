// Command-line and environment configuration (README "Options"). A flag beats its env variable,
// which beats the default. Every bad value becomes a ServiceError('ERR_CONFIG') whose
// message is one line naming the flag and the problem; the CLI prints it and exits 2.
//
// The options themselves are the table in option-table.ts; its entries drive parsing, `--help`
// and README's options table (optionsMarkdown(); test/unit/config/options.test.ts fails when
// README's copy differs).
import { defaultPrefetch, memoryBoundPrefetch } from '../amqp/prefetch.ts';
import { redactUrl, splitUrls } from '../amqp/url.ts';
import { ServiceError } from '../errors.ts';
import { type ArgvSpec, tokenize } from '../util/argv.ts';
import {
  type Config,
  derivedMaxWorkers,
  ENV_ONLY,
  LEVELS,
  OPTIONS,
  type OptionSpec,
} from './option-table.ts';

export type ParseResult = { kind: 'run'; config: Config } | { kind: 'help' } | { kind: 'version' };

const BY_NAME = new Map<string, OptionSpec>(
  OPTIONS.flatMap((o) =>
    o.alias === undefined
      ? [[o.flag, o]]
      : [
          [o.flag, o],
          [o.alias, o],
        ],
  ),
);

/** The service's argv: every option by its name and alias, with --help/-h and --version/-V. */
const ARGV_SPEC: ArgvSpec = {
  valued: new Map([...BY_NAME].map(([name, spec]) => [name, spec.arg])),
  booleans: new Set(['--help', '--version']),
  shorts: new Map([
    ['-h', '--help'],
    ['-V', '--version'],
  ]),
};

/** How an option's default reads: in --help (passwords hidden) or in README's markdown. */
export function shownDefault(spec: OptionSpec, where: 'help' | 'markdown'): string {
  let text = spec.shown;
  if (text === undefined) {
    const value = spec.default;
    if (typeof value === 'number') text = String(value);
    else if (where === 'help') text = spec.kind === 'amqp-url' ? redactUrl(String(value)) : String(value);
    else text = `\`${value}\``;
  }
  return spec.note === undefined ? text : `${text}: ${spec.note}`;
}

function fail(name: string, problem: string): never {
  throw new ServiceError('ERR_CONFIG', `${name}: ${problem}`);
}

function convert(spec: OptionSpec, name: string, raw: string): string | number {
  const shown = JSON.stringify(raw);
  switch (spec.kind) {
    case 'count': {
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of at least 1 (got ${shown})`);
      if (Number(raw) > max) fail(name, `must be a whole number from 1 to ${max} (got ${shown})`);
      return Number(raw);
    }
    case 'seconds0': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || n < 0 || n * 1000 > 2 ** 31 - 1)
        fail(name, `must be a number of seconds, 0 or more (got ${shown})`);
      return n;
    }
    case 'count0': {
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (!/^\d+$/.test(raw.trim()) || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of at least 0 (got ${shown})`);
      if (Number(raw) > max) fail(name, `must be a whole number from 0 to ${max} (got ${shown})`);
      return Number(raw);
    }
    case 'queue-type': {
      if (raw !== 'classic' && raw !== 'quorum') fail(name, `must be classic or quorum (got ${shown})`);
      return raw;
    }
    case 'bytes': {
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw)))
        fail(name, `must be a whole number of bytes, at least 1 (got ${shown})`);
      if (Number(raw) > max) fail(name, `must be a whole number of bytes from 1 to ${max} (got ${shown})`);
      return Number(raw);
    }
    case 'port': {
      const n = Number(raw);
      if (!/^\d+$/.test(raw.trim()) || n > 65535)
        fail(name, `must be a port number from 0 to 65535 (got ${shown})`);
      return n;
    }
    case 'seconds': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || n <= 0)
        fail(name, `must be a number of seconds greater than 0 (got ${shown})`);
      // setTimeout holds at most 2^31-1 ms (about 24.8 days); past that it fires at once.
      if (n * 1000 > 2 ** 31 - 1) fail(name, `must be at most 2147483 seconds (got ${shown})`);
      return n;
    }
    case 'amqp-url': {
      for (const one of splitUrls(raw)) {
        let url: URL;
        try {
          url = new URL(one);
        } catch {
          fail(name, `is not a URL (got ${JSON.stringify(redactUrl(one))})`);
        }
        if (url.protocol !== 'amqp:' && url.protocol !== 'amqps:')
          fail(name, `must be an amqp:// or amqps:// URL (got ${url.protocol}//...)`);
        if (url.hostname === '') fail(name, 'has no host');
      }
      if (splitUrls(raw).length === 0) fail(name, 'must not be empty');
      return raw;
    }
    case 'level': {
      if (!(LEVELS as readonly string[]).includes(raw))
        fail(name, `must be one of ${LEVELS.join(', ')} (got ${shown})`);
      return raw;
    }
    case 'string': {
      if (raw === '') fail(name, 'must not be empty');
      return raw;
    }
  }
}

/** Parses argv (without node and the script) and env into a Config, or help/version. */
export function parseConfig(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): ParseResult {
  const fromFlags = new Map<OptionSpec, { name: string; raw: string }>();
  for (const token of tokenize(argv, ARGV_SPEC)) {
    if (token.kind === 'terminator') fail('--', 'unknown option (see --help)');
    if (token.kind === 'word') fail(token.text, 'unexpected argument (options start with --; see --help)');
    if (token.kind === 'flag') return { kind: token.name === '--help' ? 'help' : 'version' };
    fromFlags.set(BY_NAME.get(token.name) as OptionSpec, { name: token.name, raw: token.value });
  }

  const values: Record<string, string | number> = {};
  /** How each value given was named (a flag, or its env variable), for cross-checks' errors. */
  const givenAs = new Map<OptionSpec['key'], string>();
  let prefetchGiven = false;
  let amqpUrlGiven = false;
  for (const spec of OPTIONS) {
    const flag = fromFlags.get(spec);
    const envRaw = env[spec.env];
    if (flag !== undefined) {
      values[spec.key] = convert(spec, flag.name, flag.raw);
      givenAs.set(spec.key, flag.name);
    } else if (envRaw !== undefined && envRaw !== '') {
      values[spec.key] = convert(spec, spec.env, envRaw);
      givenAs.set(spec.key, spec.env);
    } else {
      if (spec.default !== undefined) values[spec.key] = spec.default;
      continue;
    }
    if (spec.key === 'prefetch') prefetchGiven = true;
    if (spec.key === 'amqpUrl') amqpUrlGiven = true;
  }
  const config = values as unknown as Config;
  config.prefetchAuto = !prefetchGiven;
  config.amqpUrlGiven = amqpUrlGiven;
  if (!prefetchGiven) config.prefetch = defaultPrefetch(config.workers);
  config.maxResultBytes ??= config.maxMessageBytes;
  config.maxHeldBytes ??= Math.max(64 * 1024 * 1024, 4 * config.maxMessageBytes);
  // Before any body is seen, the largest one accepted must fit the window in the budget.
  if (!prefetchGiven)
    config.prefetch = memoryBoundPrefetch(config.prefetch, config.maxHeldBytes, config.maxMessageBytes);
  const maxWorkersAs = givenAs.get('maxWorkers');
  config.maxWorkers ??= derivedMaxWorkers();
  if (config.workers > config.maxWorkers)
    fail(
      givenAs.get('workers') ?? '--workers',
      `must be at most ${config.maxWorkers} (${maxWorkersAs === undefined ? "--max-workers, derived from this machine's memory" : maxWorkersAs}; got ${config.workers})`,
    );
  const token = env[ENV_ONLY.env];
  config.shutdownToken = token === undefined || token === '' ? undefined : token;
  return { kind: 'run', config };
}

export function helpText(): string {
  const lines = [
    'Usage: amqp-concurrency [options]           run the service',
    '       amqp-concurrency publish FUNC [ARGS]  send a task (see publish --help)',
    '       amqp-concurrency status               show the workers (see status --help)',
    '',
    'Options (each also read from the env variable shown):',
  ];
  for (const o of OPTIONS) {
    const left = `  ${o.flag} ${o.arg}`.padEnd(32);
    const colon = o.shown === undefined ? '' : ':'; // (default 30), (default: automatic...)
    lines.push(`${left}${o.help} (default${colon} ${shownDefault(o, 'help')})  [${o.env}]`);
  }
  lines.push(
    `${'  --help, -h'.padEnd(32)}print this help`,
    `${'  --version, -V'.padEnd(32)}print the version`,
    '',
    `${ENV_ONLY.env} (env only) ${ENV_ONLY.help}.`,
    `The Python tool's spellings ${OPTIONS.flatMap((o) => o.alias ?? []).join(', ')} are accepted too.`,
  );
  return lines.join('\n');
}

/**
 * README's options table, made from OPTIONS: flag (and the Python tool's spelling), env
 * variable, default, what it does. `npm run docs:options` prints it.
 */
export function optionsMarkdown(): string {
  const cell = (text: string) => text.replaceAll('|', '\\|');
  const rows = [
    "| flag (the Python tool's spelling also works) | env | default | what it does |",
    '| --- | --- | --- | --- |',
  ];
  for (const o of OPTIONS) {
    const flag = `\`${o.flag} ${o.arg}\`${o.alias === undefined ? '' : ` (\`${o.alias}\`)`}`;
    rows.push(`| ${cell(flag)} | \`${o.env}\` | ${cell(shownDefault(o, 'markdown'))} | ${cell(o.help)} |`);
  }
  rows.push(`| (none) | \`${ENV_ONLY.env}\` | ${cell(ENV_ONLY.shown)} | ${cell(ENV_ONLY.help)} |`);
  return rows.join('\n');
}
