// Real faults on the real broker, with rabbitmqctl. A test that stops the broker starts it
// again in its teardown, even when it fails: the next test, CI and the next session find
// the broker as it was.
//
// Every call is asynchronous: the test process also hosts the service under test, whose
// worker timeout is 5 s, and a blocking CLI call (about a second each, more on a loaded
// machine) would freeze its event loop and turn short tasks into timeouts.
//
// `rabbitmqctl` is whatever comes first on PATH: with several brokers on one machine, put
// the wrapper of the broker under test first (e.g. ../shared/rabbitmq-versions/bin/4.3), so
// that a fault test stops only that one. `faultsUnavailable` checks that it does.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await run('rabbitmqctl', args, { encoding: 'utf8', timeout: 120_000 });
  return stdout;
}

/** The AMQP port in `url` (5672 when it names none). */
function amqpPort(url: string): number {
  const parsed = new URL(url);
  return parsed.port === '' ? 5672 : Number(parsed.port);
}

/**
 * Why fault tests cannot run here, or undefined when they can: `rabbitmqctl` on PATH must
 * reach a local broker that listens on the port of `amqpUrl`, so that stopping "the broker"
 * stops the one the tests use and no other.
 */
export async function faultsUnavailable(amqpUrl: string): Promise<string | undefined> {
  let status: string;
  try {
    status = await ctl('status', '--formatter', 'json');
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') return 'rabbitmqctl is not on this machine (the broker is elsewhere)';
    return `rabbitmqctl status failed: ${(e.stderr ?? e.message).trim().split('\n')[0]}`;
  }
  const listeners = (JSON.parse(status) as { listeners?: { protocol: string; port: number }[] }).listeners;
  const ports = (listeners ?? []).filter((l) => l.protocol === 'amqp').map((l) => l.port);
  const want = amqpPort(amqpUrl);
  if (!ports.includes(want))
    return `rabbitmqctl on PATH reaches the broker on AMQP port ${ports.join(', ') || 'none'}, not ${want} of AMQP_URL: put that broker's rabbitmqctl first on PATH`;
  return undefined;
}

/** Closes the broker connections whose connection_name contains `fragment`; returns how many. */
export async function closeConnections(fragment: string): Promise<number> {
  const lines = (
    await ctl('list_connections', 'pid', 'client_properties', '--quiet', '--no-table-headers')
  ).split('\n');
  let closed = 0;
  for (const line of lines) {
    const [pid, props] = line.split('\t');
    if (pid === undefined || props === undefined) continue;
    const name = /\{"connection_name","([^"]*)"\}/.exec(props)?.[1];
    if (name?.includes(fragment)) {
      await ctl('close_connection', pid, 'fault test: forced close');
      closed++;
    }
  }
  return closed;
}

export async function stopBroker(): Promise<void> {
  await ctl('stop_app');
}

export async function startBroker(): Promise<void> {
  await ctl('start_app');
  await ctl('await_startup', '--timeout', '120');
}
