// amqp-concurrency publish FUNC [ARGS...] [--kwargs JSON] [--wait] [--timeout SECONDS] [--priority N] [--delay SECONDS]
// Sends one task with publisher confirms and prints its message id, or with --wait
// awaits the result through direct reply-to and prints it as JSON.

import { DEFAULT_URLS } from '../amqp/defaults.ts';
import { redactUrl } from '../amqp/url.ts';
import { createClient } from '../client/client.ts';
import { parseConfig } from '../config/options.ts';
import { TaskCallError } from '../errors.ts';
import { type Io, lastFlag, splitArgs, usage } from './args.ts';

export const PUBLISH_HELP = `Usage: amqp-concurrency publish FUNC [ARGS...] [options]

Publishes {"func": FUNC, "args": [ARGS...], "kwargs": {...}} (persistent, with publisher
confirms) and prints its message id. Each ARG is JSON where it parses (1 is a number,
'"1"' a string, [1,2] an array) and a plain string otherwise; put -- before ARGS that
start with --.

  --kwargs JSON          keyword arguments, a JSON object
  --wait                 wait for the result (direct reply-to) and print it as JSON;
                         a task that does not succeed prints "KIND: MESSAGE" on stderr
                         and exits 1
  --timeout SECONDS      how long --wait waits (default 30)
  --priority N           0 to 255; higher runs first (the queue needs --max-priority)
  --delay SECONDS        run no earlier than this from now (the x-delay header)
  --amqp-url URL         [AMQP_URL] (--amqp_url also works; default testuser, then guest, on localhost)
  --exchange NAME        [EXCHANGE] (default curio_amqp_exchange)
  --routing-key KEY      [ROUTING_KEY] (default curio_amqp)
  --help                 print this help

Exit codes: 0 sent (or succeeded), 1 the task or the broker failed, 2 bad usage.`;

const AMQP_FLAGS = ['--amqp-url', '--amqp_url', '--exchange', '--routing-key'];

export interface PublishPlan {
  func: string;
  args: unknown[];
  kwargs: Record<string, unknown> | undefined;
  /** Set with --wait: how long to wait for the result. */
  waitMs: number | undefined;
  /** Undefined: none given, the client tries the default accounts. */
  url: string | undefined;
  exchange: string;
  routingKey: string;
  priority: number | undefined;
  delayMs: number | undefined;
}

/** An argument is JSON where it parses (`1`, `"1"`, `[1]`), a plain string otherwise. */
export function parseArg(word: string): unknown {
  try {
    return JSON.parse(word);
  } catch {
    return word;
  }
}

/** Reads the subcommand's argv and env; throws ERR_CONFIG (exit 2) for bad usage. */
export function parsePublishArgs(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): PublishPlan | 'help' {
  const { flags, words, help } = splitArgs(
    argv,
    ['--kwargs', '--timeout', '--priority', '--delay', ...AMQP_FLAGS],
    ['--wait'],
  );
  if (help) return 'help';
  const [func, ...rawArgs] = words;
  if (func === undefined || func === '') usage('publish: FUNC is missing (see publish --help)');

  let kwargs: Record<string, unknown> | undefined;
  const kwargsRaw = lastFlag(flags, '--kwargs');
  if (kwargsRaw !== undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(kwargsRaw);
    } catch {
      usage(`--kwargs: is not JSON (got ${JSON.stringify(kwargsRaw)})`);
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
      usage(`--kwargs: must be a JSON object (got ${JSON.stringify(kwargsRaw)})`);
    kwargs = parsed as Record<string, unknown>;
  }

  const wait = lastFlag(flags, '--wait') !== undefined;
  const timeoutRaw = lastFlag(flags, '--timeout');
  if (timeoutRaw !== undefined && !wait) usage('--timeout: only means something with --wait');
  const timeout = Number(timeoutRaw ?? '30');
  if (timeoutRaw?.trim() === '' || !Number.isFinite(timeout) || timeout <= 0 || timeout > 2_147_483)
    usage(`--timeout: must be a number of seconds greater than 0 (got ${JSON.stringify(timeoutRaw)})`);

  const priorityRaw = lastFlag(flags, '--priority');
  const priority = priorityRaw === undefined ? undefined : Number(priorityRaw);
  if (priority !== undefined && (!/^\d{1,3}$/.test(priorityRaw as string) || priority > 255))
    usage(`--priority: must be a whole number from 0 to 255 (got ${JSON.stringify(priorityRaw)})`);
  const delayRaw = lastFlag(flags, '--delay');
  const delay = delayRaw === undefined ? undefined : Number(delayRaw);
  if (
    delay !== undefined &&
    (delayRaw?.trim() === '' || !Number.isFinite(delay) || delay < 0 || delay * 1000 > 2 ** 32 - 1)
  )
    usage(`--delay: must be a number of seconds from 0 to about 49 days (got ${JSON.stringify(delayRaw)})`);

  // The broker settings are the service's own flags and env: its parser checks them.
  const parsed = parseConfig(
    flags.filter(([name]) => AMQP_FLAGS.includes(name)).map(([name, value]) => `${name}=${value}`),
    { AMQP_URL: env.AMQP_URL, EXCHANGE: env.EXCHANGE, ROUTING_KEY: env.ROUTING_KEY },
  );
  if (parsed.kind !== 'run') usage('publish: unexpected option');
  const { amqpUrl, amqpUrlGiven, exchange, routingKey } = parsed.config;
  return {
    func,
    args: rawArgs.map(parseArg),
    kwargs,
    waitMs: wait ? timeout * 1000 : undefined,
    url: amqpUrlGiven ? amqpUrl : undefined,
    exchange,
    routingKey,
    priority,
    delayMs: delay === undefined ? undefined : Math.round(delay * 1000),
  };
}

export async function publishCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  io: Io,
): Promise<number> {
  const plan = parsePublishArgs(argv, env);
  if (plan === 'help') {
    io.out(`${PUBLISH_HELP}\n`);
    return 0;
  }
  const client = await createClient({
    ...(plan.url === undefined ? {} : { url: plan.url }),
    exchange: plan.exchange,
    routingKey: plan.routingKey,
  }).catch((err: unknown) => {
    const where = plan.url === undefined ? DEFAULT_URLS.map(redactUrl).join(' or ') : redactUrl(plan.url);
    throw new Error(`cannot connect to ${where}: ${(err as Error).message}`, { cause: err });
  });
  try {
    // TRACEPARENT (as otel-cli and CI systems set it): the task's span becomes its child.
    const traceparent = env.TRACEPARENT?.trim();
    const options = {
      ...(traceparent ? { headers: { traceparent } } : {}),
      ...(plan.priority === undefined ? {} : { priority: plan.priority }),
      ...(plan.delayMs === undefined ? {} : { delayMs: plan.delayMs }),
    };
    if (plan.waitMs === undefined) {
      io.out(`${await client.send(plan.func, plan.args, plan.kwargs, options)}\n`);
      return 0;
    }
    try {
      const result = await client.call(plan.func, plan.args, plan.kwargs, {
        timeoutMs: plan.waitMs,
        ...options,
      });
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
