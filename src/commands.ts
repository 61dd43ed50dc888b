// The CLI's subcommands besides the service itself:
//   amqp-concurrency publish FUNC [ARGS...] [--kwargs JSON] [--wait] [--timeout SECONDS]
//   amqp-concurrency status [--url URL] [--token TOKEN]
// Each returns its exit code; cli.ts owns the process.
import { createClient, TaskCallError } from './client.ts';
import { DEFAULT_AMQP_URL, redactUrl } from './config.ts';
import { ServiceError } from './errors.ts';
import type { StatusReport } from './http.ts';

export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
}

function usage(message: string): never {
  throw new ServiceError('ERR_CONFIG', message);
}

/** Splits `--flag value` / `--flag=value` options (by their names) from positional words. */
function split(argv: readonly string[], valued: readonly string[], booleans: readonly string[]) {
  const flags = new Map<string, string>();
  const words: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (!arg.startsWith('--') || arg === '--') {
      words.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    if (booleans.includes(name)) flags.set(name, 'true');
    else if (valued.includes(name)) {
      const value = eq === -1 ? argv[++i] : arg.slice(eq + 1);
      if (value === undefined) usage(`${name}: needs a value`);
      flags.set(name, value);
    } else usage(`${name}: unknown option (see --help)`);
  }
  return { flags, words };
}

/** An argument is JSON where it parses (`1`, `"1"`, `[1]`), a plain string otherwise. */
export function parseArg(word: string): unknown {
  try {
    return JSON.parse(word);
  } catch {
    return word;
  }
}

export const PUBLISH_HELP = `Usage: amqp-concurrency publish FUNC [ARGS...] [options]

Publishes {"func": FUNC, "args": [ARGS...]} with publisher confirms. Each ARG is JSON
where it parses (1 is a number, '"1"' a string) and a plain string otherwise.

  --kwargs JSON          keyword arguments, a JSON object
  --wait                 wait for the result (direct reply-to) and print it as JSON
  --timeout SECONDS      how long --wait waits (default 30)
  --amqp-url URL         [AMQP_URL] (--amqp_url also works)
  --exchange NAME        [EXCHANGE] (default curio_amqp_exchange)
  --routing-key KEY      [ROUTING_KEY] (default curio_amqp)`;

export async function publishCommand(
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
  io: Io,
): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.out(`${PUBLISH_HELP}\n`);
    return 0;
  }
  const { flags, words } = split(
    argv,
    ['--kwargs', '--timeout', '--amqp-url', '--amqp_url', '--exchange', '--routing-key'],
    ['--wait'],
  );
  const [func, ...rawArgs] = words;
  if (func === undefined) usage('publish: FUNC is missing (see publish --help)');
  let kwargs: Record<string, unknown> | undefined;
  const kwargsRaw = flags.get('--kwargs');
  if (kwargsRaw !== undefined) {
    const parsed = parseArg(kwargsRaw);
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
      usage('--kwargs: must be a JSON object');
    kwargs = parsed as Record<string, unknown>;
  }
  const timeout = Number(flags.get('--timeout') ?? '30');
  if (!Number.isFinite(timeout) || timeout <= 0)
    usage('--timeout: must be a number of seconds greater than 0');
  const url = flags.get('--amqp-url') ?? flags.get('--amqp_url') ?? (env.AMQP_URL || DEFAULT_AMQP_URL);
  if (!/^amqps?:\/\//.test(url))
    usage(`--amqp-url: must be an amqp:// or amqps:// URL (got ${redactUrl(url)})`);
  const client = await createClient({
    url,
    exchange: flags.get('--exchange') ?? (env.EXCHANGE || undefined),
    routingKey: flags.get('--routing-key') ?? (env.ROUTING_KEY || undefined),
  });
  try {
    const args = rawArgs.map(parseArg) as never;
    if (!flags.has('--wait')) {
      io.out(`${await client.send(func as never, args, kwargs)}\n`);
      return 0;
    }
    try {
      const result = await client.call(func as never, args, kwargs, { timeoutMs: timeout * 1000 });
      io.out(`${JSON.stringify(result) ?? 'null'}\n`);
      return 0;
    } catch (err) {
      if (!(err instanceof TaskCallError)) throw err;
      io.err(`${err.kind}: ${err.message}\n`);
      return 1;
    }
  } finally {
    await client.close();
  }
}

function formatBytes(n: number | undefined): string {
  return n === undefined ? '-' : `${(n / 2 ** 20).toFixed(1)} MB`;
}

export function formatStatus(report: StatusReport): string {
  const rows = [['PID', 'STATE', 'FUNC', 'FOR', 'TASKS', 'RSS']];
  for (const w of report.workers) {
    rows.push([
      String(w.pid ?? '-'),
      w.state,
      w.func ?? '-',
      w.runningForMs === undefined ? '-' : `${(w.runningForMs / 1000).toFixed(1)} s`,
      String(w.tasksDone),
      formatBytes(w.rssBytes),
    ]);
  }
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] as string).length))) ?? [];
  const lines = rows.map((r) =>
    r
      .map((cell, i) => cell.padEnd(widths[i] as number))
      .join('  ')
      .trimEnd(),
  );
  const h = report.health;
  lines.push(
    '',
    `status ${h.status}; ${h.workers.up}/${h.workers.desired} workers up; ${report.queued} queued; prefetch ${report.prefetch}`,
  );
  return `${lines.join('\n')}\n`;
}

export async function statusCommand(
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
  io: Io,
): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.out(
      'Usage: amqp-concurrency status [--url http://127.0.0.1:8080] [--token TOKEN]  (token: SHUTDOWN_TOKEN)\n',
    );
    return 0;
  }
  const { flags, words } = split(argv, ['--url', '--token'], []);
  if (words.length > 0) usage(`${words[0]}: unexpected argument`);
  const base = flags.get('--url') ?? `http://127.0.0.1:${env.HTTP_PORT || 8080}`;
  const token = flags.get('--token') ?? env.SHUTDOWN_TOKEN ?? '';
  const res = await fetch(new URL('/status', base), { headers: { authorization: `Bearer ${token}` } });
  if (res.status !== 200) {
    io.err(
      `status: ${res.status} ${((await res.json().catch(() => ({}))) as { error?: string }).error ?? ''}\n`,
    );
    return 1;
  }
  io.out(formatStatus((await res.json()) as StatusReport));
  return 0;
}
