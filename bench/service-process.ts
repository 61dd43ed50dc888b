// The service as a bench runs it: a process started by its CLI, as a user starts it, and
// read only through its HTTP routes (/health until ready, /metrics for the outcome count),
// so the figures include everything a deployment pays. Used on the single broker
// (bench.ts) and on the kit's cluster (cluster.ts).
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import type { Channel } from 'amqplib';
import { controlExchangeName } from '../src/amqp/control.ts';

const CLI = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));
const TASKS = fileURLToPath(new URL('./tasks.ts', import.meta.url));

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface ServiceProcess {
  child: ChildProcess;
  port: number;
  metrics: () => Promise<string>;
  /** Outcomes so far, all outcomes summed (amqp_concurrency_tasks_total). */
  total: () => Promise<number>;
  /** SIGTERM (a drain), resolved when the process has exited. */
  stop: () => Promise<void>;
}

/** Deletes what a service declares beside its queue: its exchange and the control exchange of cancels. */
export async function deleteServiceExchanges(channel: Channel, queue: string): Promise<void> {
  await channel.deleteExchange(`${queue}.x`).catch(() => {});
  await channel.deleteExchange(controlExchangeName(queue)).catch(() => {});
}

/** Outcomes in one /metrics text, all outcomes summed (amqp_concurrency_tasks_total). */
export function outcomes(metricsText: string): number {
  return metricsText
    .split('\n')
    .filter((l) => l.startsWith('amqp_concurrency_tasks_total{'))
    .reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);
}

/** One unlabelled sample of a /metrics text (NaN when absent). */
export function sample(metricsText: string, name: string): number {
  const line = metricsText.split('\n').find((l) => l.startsWith(`${name} `));
  return Number(line?.split(' ').at(-1));
}

/** Starts the service on `queue` (exchange `<queue>.x`, bench/tasks.ts) and waits until /health says 200. */
export async function startServiceProcess(opts: {
  amqpUrl: string;
  queue: string;
  workers: number;
  extra?: string[];
}): Promise<ServiceProcess> {
  const port = 20000 + Math.floor(Math.random() * 20000);
  const { queue } = opts;
  const child = spawn(
    process.execPath,
    [
      CLI,
      '--queue',
      queue,
      '--exchange',
      `${queue}.x`,
      '--workers',
      String(opts.workers),
      '--task-path',
      TASKS,
      '--http-port',
      String(port),
      ...(opts.extra ?? []),
    ],
    {
      env: { ...process.env, AMQP_URL: opts.amqpUrl, LOG_LEVEL: 'warn' },
      stdio: ['ignore', 'ignore', 'inherit'],
    },
  );
  const metrics = async () => (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const total = async () => outcomes(await metrics());
  for (;;) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/health`)).status === 200) break;
    } catch {}
    await sleep(50);
  }
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    await once(child, 'exit');
  };
  return { child, port, metrics, total, stop };
}

/**
 * Waits until `total()` reaches `n`; returns the outcomes per second after the first
 * `warmUp`. Each poll is a full scrape of the service's /metrics, about a millisecond of
 * the master's CPU, which the raw consumer it is compared with does not pay: polled every
 * 5 ms and 25 ms, the scrapes took some 7% of the master in a profile and the rate moved
 * by about as much. So they are spaced out (25 ms to find the start of the count, 100 ms
 * after); the moment the n-th outcome came is interpolated between the last two polls
 * instead of rounded up to a poll.
 */
export async function rateUntil(
  total: () => Promise<number>,
  n: number,
  warmUp: number,
  pollMs = 100,
): Promise<number> {
  let first = await total();
  while (first < warmUp) {
    await sleep(25);
    first = await total();
  }
  // The count starts at the poll that passed the warm-up: `first` outcomes at `start`.
  const start = performance.now();
  let before = { at: start, total: first };
  for (;;) {
    await sleep(pollMs);
    const now = { total: await total(), at: performance.now() };
    if (now.total >= n) {
      const end = before.at + ((now.at - before.at) * (n - before.total)) / (now.total - before.total);
      return (n - first) / ((end - start) / 1000);
    }
    before = now;
  }
}
