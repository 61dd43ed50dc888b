#!/usr/bin/env node
// The entry point, and the only module that touches `process`: it reads the flags and the
// env, owns the signals and the exit codes (2: a bad flag, task module or topology).
import { readFileSync } from 'node:fs';
import v8 from 'node:v8';
import { helpText, parseConfig } from '../config/options.ts';
import { exitCodeFor, ServiceError } from '../errors.ts';
import { Service } from '../service/service.ts';
import { type TracingConfig, tracingConfig } from '../telemetry/config.ts';
import { createLogger } from '../util/logger.ts';
import { resolveTaskModule } from '../worker/task-module.ts';
import { cancelCommand } from './cancel-command.ts';
import { deadCommand } from './dead-command.ts';
import { publishCommand } from './publish-command.ts';
import { statusCommand } from './status-command.ts';

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

function die(err: unknown): never {
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`amqp-concurrency: ${message}\n`);
  // A task module's own error: its stack says where, which a user needs to fix it.
  const cause = err instanceof ServiceError ? (err.cause as { stack?: unknown } | undefined) : undefined;
  if (err instanceof ServiceError && err.code === 'ERR_TASK_MODULE' && typeof cause?.stack === 'string') {
    process.stderr.write(`${cause.stack}\n`);
  }
  process.exit(exitCodeFor(err));
}

/** The subcommands besides the service itself; each returns its exit code. */
const SUBCOMMANDS = {
  publish: publishCommand,
  status: statusCommand,
  cancel: cancelCommand,
  dead: deadCommand,
} as const;

async function subcommand(run: (typeof SUBCOMMANDS)[keyof typeof SUBCOMMANDS]): Promise<never> {
  const io = { out: (t: string) => process.stdout.write(t), err: (t: string) => process.stderr.write(t) };
  try {
    const code = await run(process.argv.slice(3), process.env, io);
    // Let stdout drain before exiting: a pipe is asynchronous on some systems.
    await new Promise<void>((resolve) => process.stdout.write('', () => resolve()));
    process.exit(code);
  } catch (err) {
    die(err);
  }
}

/**
 * Stops the master's young generation from growing once the service is ready. V8 doubles
 * it each time as many bytes have survived its scavenges as it holds, counted since the
 * last doubling and never forgotten, so any long run doubles it, up to 64 MB semi-spaces
 * here, however little lives: after 200,000 tasks the master held 42 MB more RSS than
 * after 10,000, with its old generation flat. A scavenge costs what survives it, not the
 * space's size, so the size reached while starting (16 MB here) is enough
 * (docs/benchmarks.md). The growth factor is read at each scavenge; the space's maximum is
 * fixed when the heap is made, too late to set from here. Left alone when the user sets
 * any semi-space flag of their own.
 */
function holdYoungGeneration(): void {
  const own = [...process.execArgv, process.env.NODE_OPTIONS ?? ''].some((a) => a.includes('semi-space'));
  if (!own) v8.setFlagsFromString('--semi-space-growth-factor=1');
}

async function main(): Promise<void> {
  const command = process.argv[2];
  if (command !== undefined && Object.hasOwn(SUBCOMMANDS, command))
    await subcommand(SUBCOMMANDS[command as keyof typeof SUBCOMMANDS]);
  let parsed: ReturnType<typeof parseConfig>;
  let moduleUrl: string;
  try {
    parsed = parseConfig(process.argv.slice(2), process.env);
    if (parsed.kind === 'help') {
      process.stdout.write(`${helpText()}\n`);
      return;
    }
    if (parsed.kind === 'version') {
      process.stdout.write(`${version()}\n`);
      return;
    }
    moduleUrl = resolveTaskModule(parsed.config.taskPath, process.cwd());
  } catch (err) {
    die(err);
  }
  let tracing: TracingConfig | undefined;
  try {
    tracing = tracingConfig(process.env);
  } catch (err) {
    die(new ServiceError('ERR_CONFIG', (err as Error).message));
  }
  const { config } = parsed;
  const logger = createLogger(config.logLevel);
  const service = new Service({ config, moduleUrl, logger, ...(tracing === undefined ? {} : { tracing }) });

  // The first SIGTERM/SIGINT drains; a second one stops at once, and the broker requeues
  // whatever was not acked. The deadline timer starts before the drain.
  let signalled = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (signalled) {
      logger.warn({ signal }, 'second signal: stopping now');
      process.exit(1);
    }
    signalled = true;
    void service.drain(signal);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  // gunicorn's signals: TTIN adds a worker, TTOU removes one (after its task), HUP rolls
  // every worker onto the task module's current code.
  const resizeBy = (delta: number) => {
    const count = service.pool.size + delta;
    if (count < 1) return logger.warn('SIGTTOU: already at one worker');
    try {
      service.setWorkers(count);
    } catch (err) {
      logger.warn({ err }, 'cannot resize now');
    }
  };
  process.on('SIGTTIN', () => resizeBy(1));
  process.on('SIGTTOU', () => resizeBy(-1));
  process.on('SIGHUP', () => {
    logger.info('SIGHUP: reloading the workers');
    void service.reload();
  });

  // The last resort. After an error nobody caught, the master's state cannot be trusted:
  // write down the message being handled, if any (a crash loop is broken by it, see
  // crash-journal.ts), and stop; the orchestrator restarts us and the broker gives back
  // whatever was not acked. Every known failure is handled where it happens; this is for
  // the unknown ones.
  const lastResort = (err: unknown, origin: string) => {
    try {
      service.recordCrash();
      logger.fatal({ err, origin }, 'an error nobody caught: stopping');
    } finally {
      process.exit(1);
    }
  };
  process.on('uncaughtException', (err, origin) => lastResort(err, origin));
  process.on('unhandledRejection', (reason) => lastResort(reason, 'unhandledRejection'));

  try {
    await service.start();
  } catch (err) {
    die(err);
  }
  holdYoungGeneration();
  logger.info({ port: service.httpPort }, 'ready');
  const ending = await service.ended;
  if (ending.error !== undefined) die(ending.error);
  process.exit(ending.code);
}

await main();
