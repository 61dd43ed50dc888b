// amqp-concurrency status [--url URL] [--token TOKEN]
// GETs /status from a running service and prints its workers as a table.

import type { StatusReport } from '../http/server.ts';
import { type Io, lastFlag, splitArgs, usage } from './args.ts';

export const STATUS_HELP = `Usage: amqp-concurrency status [options]

Prints the workers of a running service (GET /status): pid, state, current func and
for how long, tasks done, RSS.

  --url URL        the service's HTTP address (default http://127.0.0.1:$HTTP_PORT,
                   HTTP_PORT defaulting to 8080)
  --token TOKEN    the bearer token [SHUTDOWN_TOKEN]
  --help           print this help

Exit codes: 0 printed, 1 the service refused or could not be reached, 2 bad usage.`;

export interface StatusPlan {
  url: URL;
  token: string;
}

export function parseStatusArgs(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): StatusPlan | 'help' {
  const { flags, words, help } = splitArgs(argv, ['--url', '--token']);
  if (help) return 'help';
  if (words[0] !== undefined) usage(`${words[0]}: unexpected argument (see status --help)`);
  const base = lastFlag(flags, '--url') ?? `http://127.0.0.1:${env.HTTP_PORT || 8080}`;
  let url: URL;
  try {
    url = new URL(base);
  } catch {
    usage(`--url: is not a URL (got ${JSON.stringify(base)})`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:')
    usage(`--url: must be an http:// or https:// URL (got ${JSON.stringify(base)})`);
  // Relative to the base's path, so that a service behind a path prefix works too.
  if (!url.pathname.endsWith('/')) url.pathname += '/';
  return { url: new URL('status', url), token: lastFlag(flags, '--token') ?? env.SHUTDOWN_TOKEN ?? '' };
}

function seconds(ms: number | undefined): string {
  if (ms === undefined) return '-';
  const s = ms / 1000;
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function megabytes(bytes: number | undefined): string {
  return bytes === undefined ? '-' : `${(bytes / 2 ** 20).toFixed(1)} MB`;
}

/** The report as an aligned table, one worker a row, and a summary line. */
/** Rows as aligned columns, two spaces apart. */
function table(rows: string[][]): string[] {
  const widths = (rows[0] as string[]).map((_, i) => Math.max(...rows.map((r) => (r[i] as string).length)));
  return rows.map((r) =>
    r
      .map((cell, i) => cell.padEnd(widths[i] as number))
      .join('  ')
      .trimEnd(),
  );
}

export function formatStatus(report: StatusReport): string {
  const rows = [['PID', 'STATE', 'FUNC', 'FOR', 'TASKS', 'RSS']];
  for (const w of report.workers) {
    rows.push([
      String(w.pid ?? '-'),
      w.state,
      w.func ?? '-',
      seconds(w.runningForMs),
      String(w.tasksDone),
      megabytes(w.rssBytes),
    ]);
  }
  const lines = table(rows);
  const h = report.health;
  lines.push(
    '',
    `status ${h.status}${h.reason === undefined ? '' : ` (${h.reason})`}; ${h.workers.up}/${h.workers.desired} workers up; ${report.queued} queued; prefetch ${report.prefetch}`,
  );
  // The functions with options of their own (README "Per-task options").
  const funcs = Object.entries(report.funcs ?? {});
  if (funcs.length > 0) {
    const own = [['FUNC', 'TIMEOUT', 'RETRIES', 'CONCURRENCY', 'RATE', 'RUNNING']];
    for (const [name, f] of funcs)
      own.push([
        name,
        f.timeoutMs === undefined ? '-' : seconds(f.timeoutMs),
        f.maxRetries === undefined ? '-' : String(f.maxRetries),
        f.concurrency === undefined ? '-' : String(f.concurrency),
        f.rateLimit ?? '-',
        String(f.running),
      ]);
    lines.push('', ...table(own));
  }
  return `${lines.join('\n')}\n`;
}

export async function statusCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  io: Io,
): Promise<number> {
  const plan = parseStatusArgs(argv, env);
  if (plan === 'help') {
    io.out(`${STATUS_HELP}\n`);
    return 0;
  }
  let res: Response;
  try {
    res = await fetch(plan.url, {
      headers: { authorization: `Bearer ${plan.token}` },
      signal: AbortSignal.timeout(10_000),
    });
  } catch (err) {
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    io.err(`status: cannot reach ${plan.url}: ${cause?.code ?? cause?.message ?? (err as Error).message}\n`);
    return 1;
  }
  const body = (await res.json().catch(() => undefined)) as (StatusReport & { error?: string }) | undefined;
  if (res.status !== 200 || body === undefined) {
    const hint = res.status === 401 ? ' (pass --token or set SHUTDOWN_TOKEN)' : '';
    io.err(`status: ${res.status} ${body?.error ?? res.statusText}${hint}\n`);
    return 1;
  }
  io.out(formatStatus(body));
  return 0;
}
