// Shared test plumbing: the broker URL, fresh queue names, a publishing/reading channel,
// an in-process service, and a spawned CLI. Teardown is registered next to setup (t.after).
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import amqp, { type ChannelModel, type ConfirmChannel, type GetMessage, type Options } from 'amqplib';
import pino from 'pino';
import { controlExchangeName } from '../../src/amqp/control.ts';
import { DELAY_STEPS_MS, delayQueueName } from '../../src/amqp/delay.ts';
import type { Config } from '../../src/config/option-table.ts';
import { parseConfig } from '../../src/config/options.ts';
import { Service } from '../../src/service/service.ts';
import { resolveTaskModule } from '../../src/worker/task-module.ts';
import { testBrokerUrl } from './broker-url.ts';

export { taskRequest } from './task-request.ts';

/** AMQP_URL, or the default account the local broker accepts (see broker-url.ts). */
export const AMQP_URL = await testBrokerUrl();
export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const FIXTURE_TASKS = fileURLToPath(new URL('../fixtures/tasks.ts', import.meta.url));
export const CLI = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url));

interface TestContext {
  after: (fn: () => unknown) => void;
  name: string;
}

/** A queue name no other test uses, readable in the management UI. */
export function freshName(t: { name: string }): string {
  const slug = t.name.replace(/[^a-z0-9]+/gi, '-').slice(0, 40);
  return `test.${slug}.${randomUUID().slice(0, 8)}`;
}

/**
 * The errors with which the broker refused a live test connection or channel (a channel
 * error, or a connection closed with other than 320 CONNECTION_FORCED): every `waitFor` in
 * flight rejects with the first, so that the test fails at once with the broker's reason.
 */
const brokerRefusals = new Set<Error>();

/** Waits until `check` returns a truthy value, polling; fails with `what` after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => T | Promise<T>,
  timeoutMs = 15_000,
): Promise<NonNullable<T>> {
  const start = performance.now();
  for (;;) {
    const [refusal] = brokerRefusals;
    if (refusal !== undefined) throw refusal;
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (performance.now() - start > timeoutMs)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export interface Broker {
  connection: ChannelModel;
  channel: ConfirmChannel;
  /** Publishes to the default exchange (straight to `queue`) and waits for the confirm. */
  send(queue: string, body: unknown, options?: Options.Publish): Promise<void>;
  /** Takes every message now in `queue` (no ack needed: they are gone). */
  drainQueue(queue: string): Promise<GetMessage[]>;
  /** Waits until `n` messages have been taken from `queue` (across polls), and returns them. */
  take(queue: string, n: number, timeoutMs?: number): Promise<GetMessage[]>;
  count(queue: string): Promise<number>;
  /** Deletes the queues at teardown. */
  cleanup(...queues: string[]): void;
}

export async function broker(t: TestContext): Promise<Broker> {
  const connection = await amqp.connect(AMQP_URL);
  const channel = await connection.createConfirmChannel();
  channel.on('error', () => {});
  // The broker closing this connection or channel with an error fails the test at once, with
  // its reason: every later call of the helpers below rejects with it, and so does one in
  // flight. A refusal also fails every waitFor (see brokerRefusals); a forced close (320: a
  // fault test's own doing, or the broker stopping) fails only this broker's helpers.
  let closedBy: Error | undefined;
  let failNow: (err: Error) => void = () => {};
  const failed = new Promise<never>((_, reject) => {
    failNow = reject;
  });
  failed.catch(() => {});
  const onClose = (what: string, refusal: boolean) => (err?: Error) => {
    if (err === undefined || closedBy !== undefined) return;
    closedBy = new Error(`the broker closed the test's ${what}: ${err.message}`, { cause: err });
    if (refusal) brokerRefusals.add(closedBy);
    failNow(closedBy);
  };
  connection.on('error', onClose('connection', true));
  connection.on('close', onClose('connection', false));
  let connectionClosed = false;
  connection.on('close', () => {
    connectionClosed = true;
  });
  channel.on('error', onClose('channel', true));
  // (An operation in flight may learn of the close first, as "Channel ended": the reason wins.)
  const guard = <T>(op: () => Promise<T>): Promise<T> =>
    closedBy !== undefined
      ? Promise.reject(closedBy)
      : Promise.race([
          op().catch((err: unknown) => {
            throw closedBy ?? err;
          }),
          failed,
        ]);
  const toDelete = new Set<string>();
  const exchangesToDelete = new Set<string>();
  t.after(async () => {
    if (closedBy !== undefined) brokerRefusals.delete(closedBy);
    // A connection the broker closed cannot delete anything: a new one does.
    await deleteFromBroker(toDelete, exchangesToDelete, connectionClosed ? undefined : connection);
  });
  const drainQueue = (queue: string) => guard(() => drainAll(queue));
  const drainAll = async (queue: string) => {
    const messages: GetMessage[] = [];
    for (;;) {
      const m = await channel.get(queue, { noAck: true });
      if (m === false) return messages;
      messages.push(m);
    }
  };
  return {
    connection,
    channel,
    drainQueue,
    async send(queue, body, options = {}) {
      const content = Buffer.isBuffer(body)
        ? body
        : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
      await guard(
        () =>
          new Promise<void>((resolve, reject) =>
            channel.sendToQueue(queue, content, { persistent: true, ...options }, (err) =>
              err ? reject(err) : resolve(),
            ),
          ),
      );
    },
    async take(queue, n, timeoutMs) {
      const taken: GetMessage[] = [];
      await waitFor(
        `${n} messages in ${queue}`,
        async () => {
          taken.push(...(await drainQueue(queue)));
          return taken.length >= n;
        },
        timeoutMs,
      );
      return taken;
    },
    async count(queue) {
      const ok = await guard(() => channel.checkQueue(queue));
      return ok.messageCount;
    },
    cleanup(...queues) {
      for (const q of queues) {
        toDelete.add(q);
        // A work queue brings its delay queues and its control exchange (amqp/delay.ts, amqp/control.ts).
        if (/\.(dead|retry\.\d+ms|delay\.\d+ms)$/.test(q)) continue;
        for (const step of DELAY_STEPS_MS) toDelete.add(delayQueueName(q, step));
        exchangesToDelete.add(controlExchangeName(q));
      }
    },
  };
}

/**
 * Deletes exchanges when the test ends, on a connection of its own and after the hooks
 * registered before this call (a started service's stop among them). Not through a
 * broker(t): its cleanup is registered first and so runs first (t.after runs hooks in
 * the order they were registered), and its connection is closed by the time a service
 * started later has stopped. A deletion through it failed, silently, and left a durable
 * exchange on the broker for every such test.
 */
export function deleteExchangesAfter(t: TestContext, ...exchanges: string[]): void {
  t.after(() => deleteFromBroker([], exchanges));
}

/**
 * Deletes queues and exchanges (each failure ignored), then closes the connection it
 * used: `connection` when given, else one of its own.
 */
async function deleteFromBroker(
  queues: Iterable<string>,
  exchanges: Iterable<string>,
  connection?: ChannelModel,
): Promise<void> {
  const conn = connection ?? (await amqp.connect(AMQP_URL).catch(() => undefined));
  if (conn === undefined) return; // the broker is gone (a fault test's own doing)
  try {
    const channel = await conn.createChannel();
    channel.on('error', () => {});
    for (const q of queues) await channel.deleteQueue(q).catch(() => {});
    for (const x of exchanges) await channel.deleteExchange(x).catch(() => {});
  } catch {
    // Nothing to clean on a broker that refuses us.
  } finally {
    await conn.close().catch(() => {});
  }
}

/** A config for tests: fresh queue and exchange, any free port, the fixture tasks. */
export function testConfig(t: { name: string }, overrides: Partial<Config> = {}): Config {
  const parsed = parseConfig([], {});
  if (parsed.kind !== 'run') throw new Error('unreachable');
  const queue = freshName(t);
  return {
    ...parsed.config,
    amqpUrl: AMQP_URL,
    amqpUrlGiven: true,
    queue,
    exchange: `${queue}.x`,
    routingKey: 'rk',
    httpHost: '127.0.0.1',
    httpPort: 0,
    taskPath: FIXTURE_TASKS,
    workers: 2,
    workerTimeout: 5,
    shutdownTimeout: 5,
    logLevel: process.env.TEST_LOG_LEVEL ?? 'silent',
    // A prefetch given is a fixed one, as on the command line.
    prefetchAuto: overrides.prefetch === undefined,
    ...overrides,
  };
}

/** Starts a service in-process and waits until it consumes; stops it and deletes its queues at teardown. */
export async function startService(
  t: TestContext,
  b: Broker,
  config: Config,
  extra: { publishTimeoutMs?: number } = {},
): Promise<Service> {
  const logger = pino({ level: config.logLevel });
  const service = new Service({
    config,
    moduleUrl: resolveTaskModule(config.taskPath, ROOT),
    logger,
    ...extra,
  });
  b.cleanup(config.queue, `${config.queue}.dead`);
  t.after(async () => {
    await service.drain('test teardown');
    await deleteFromBroker([], [config.exchange]);
  });
  await service.start();
  await waitFor('the service to consume', () => service.health().status === 'ok');
  return service;
}

export interface SpawnedCli {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Parsed pino lines of stdout. */
  logs: () => Record<string, unknown>[];
}

/** Runs the CLI as a user would (node src/cli.ts), killing it at teardown if it still runs. */
export function spawnCli(t: TestContext, args: string[], env: Record<string, string> = {}): SpawnedCli {
  const child = spawn(process.execPath, [CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, AMQP_URL, LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    out += d;
  });
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    err += d;
  });
  const exit = once(child, 'exit').then(([code, signal]) => ({
    code: code as number | null,
    signal: signal as NodeJS.Signals | null,
  }));
  t.after(async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    // A drain first, as an operator stops it (and so that its coverage is written), then
    // the kill if it takes longer than a test should wait.
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 3_000);
    await exit;
    clearTimeout(timer);
  });
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exit,
    logs: () =>
      out
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

/** The port a spawned CLI listens on, from its 'ready' log line. */
export async function readyPort(cli: SpawnedCli): Promise<number> {
  const line = await waitFor('the service to log ready', () => cli.logs().find((l) => l.msg === 'ready'));
  return line.port as number;
}

export async function getJson(
  port: number,
  path: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** The flags a spawned test service runs with: its own queue and exchange, any free port, the fixture tasks. */
export function cliArgs(queue: string, extra: string[] = []): string[] {
  return [
    '--queue',
    queue,
    '--exchange',
    `${queue}.x`,
    '--http-port',
    '0',
    '--task-path',
    FIXTURE_TASKS,
    ...extra,
  ];
}

/** Spawns the CLI on `queue` (later flags in `extra` win) and waits until it is healthy; cleans up after. */
export async function startCliService(
  t: TestContext,
  queue: string,
  extra: string[] = [],
  env: Record<string, string> = {},
): Promise<{ b: Broker; cli: SpawnedCli; port: number }> {
  const b = await broker(t);
  b.cleanup(queue, `${queue}.dead`);
  const cli = spawnCli(t, cliArgs(queue, extra), env);
  deleteExchangesAfter(t, `${queue}.x`);
  const port = await readyPort(cli);
  await waitFor('the service to be healthy', async () => (await getJson(port, '/health')).status === 200);
  return { b, cli, port };
}

/** The value of one series (`name{labels}`) in a /metrics text, or undefined when absent. */
function seriesIn(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

/** The value of one series (`name{labels}`) in the service's /metrics text, or undefined when absent. */
export async function seriesValue(
  service: { metrics: { registry: { metrics(): Promise<string> } } },
  series: string,
): Promise<number | undefined> {
  return seriesIn(await service.metrics.registry.metrics(), series);
}

/** The same, read over HTTP from a spawned service's /metrics on `port`. */
export async function seriesAt(port: number, series: string): Promise<number | undefined> {
  return seriesIn(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text(), series);
}

/** Whether a process with this pid exists (signal 0 checks without signalling). */
export function alive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export interface Gate {
  /** The file whose existence opens the gate: the argument of the fixture `waitAtGate`. */
  path: string;
  open(): void;
}

/**
 * A gate for tasks that must stay busy until the test has seen what it waits for: a state
 * held until the test lets go, not a moment to catch before a fixed-length task ends on a
 * machine slower than the one the test was written on.
 */
export function gate(t: TestContext): Gate {
  const dir = mkdtempSync(join(tmpdir(), 'amqpc-gate-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'gate');
  return { path, open: () => writeFileSync(path, '') };
}
