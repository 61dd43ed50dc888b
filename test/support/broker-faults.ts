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

/** Deliveries of `queue` the broker holds unacknowledged (sent to a consumer, not settled). */
export async function unackedCount(queue: string): Promise<number> {
  const out = await ctl('list_queues', 'name', 'messages_unacknowledged', '--quiet', '--no-table-headers');
  for (const line of out.split('\n')) {
    const [name, count] = line.split('\t');
    if (name === queue) return Number(count);
  }
  throw new Error(`no queue ${queue} on the broker rabbitmqctl reaches`);
}

/**
 * Raises a memory alarm on the broker (the watermark far below what it uses), so that it
 * blocks every publishing connection; resolves with a function that lowers it again, to
 * the watermark it had. Undefined when the watermark is not a plain fraction we can restore.
 */
export async function raiseMemoryAlarm(): Promise<(() => Promise<void>) | undefined> {
  const before = (await ctl('eval', 'vm_memory_monitor:get_vm_memory_high_watermark().')).trim();
  if (!/^\d+(\.\d+)?$/.test(before)) return undefined;
  await ctl('set_vm_memory_high_watermark', '0.000001');
  let lowered = false;
  return async () => {
    if (lowered) return;
    lowered = true;
    await ctl('set_vm_memory_high_watermark', before);
  };
}

/**
 * Sets the broker's global consumer_timeout (what an operator does to catch stuck
 * consumers), and has it checked every 250 ms instead of about once a minute (the channel
 * tick, and the quorum queue's tick that 4.3 checks it on), so that a test sees it fire in
 * seconds. Channels and queues made from now on take it. Resolves with a function that puts
 * back the values the broker had.
 */
export async function setGlobalConsumerTimeout(ms: number): Promise<() => Promise<void>> {
  const settings: Record<string, number> = {
    consumer_timeout: ms,
    channel_tick_interval: 250,
    quorum_tick_interval: 250,
  };
  const before = new Map<string, string>();
  for (const [key, value] of Object.entries(settings)) {
    before.set(key, (await ctl('eval', `application:get_env(rabbit, ${key}).`)).trim());
    await ctl('eval', `application:set_env(rabbit, ${key}, ${value}).`);
  }
  let restored = false;
  return async () => {
    if (restored) return;
    restored = true;
    for (const [key, was] of before) {
      const value = /^\{ok,(\d+)\}$/.exec(was)?.[1];
      if (value === undefined) await ctl('eval', `application:unset_env(rabbit, ${key}).`);
      else await ctl('eval', `application:set_env(rabbit, ${key}, ${value}).`);
    }
  };
}

/** The arguments `queue` was declared with, as rabbitmqctl prints them (an Erlang term). */
export async function queueArguments(queue: string): Promise<string> {
  const out = await ctl('list_queues', 'name', 'arguments', '--quiet', '--no-table-headers');
  for (const line of out.split('\n')) {
    const [name, args] = line.split('\t');
    if (name === queue) return args ?? '';
  }
  throw new Error(`no queue ${queue} on the broker rabbitmqctl reaches`);
}
