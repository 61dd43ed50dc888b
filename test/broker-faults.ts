// Real faults on the real broker, with rabbitmqctl. A test that stops the broker starts it
// again in its teardown, even when it fails: the next test, CI and the next session find
// the broker as it was.
import { execFileSync, spawnSync } from 'node:child_process';

/** Why fault tests cannot run here, or undefined when they can (rabbitmqctl for a local broker). */
export function faultsUnavailable(): string | undefined {
  const probe = spawnSync('rabbitmqctl', ['--version'], { encoding: 'utf8' });
  if (probe.error !== undefined) return 'rabbitmqctl is not on this machine (the broker is elsewhere)';
  return undefined;
}

function ctl(...args: string[]): string {
  return execFileSync('rabbitmqctl', args, {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 120_000,
  });
}

/** Closes the broker connections whose connection_name contains `fragment`; returns how many. */
export function closeConnections(fragment: string): number {
  const lines = ctl('list_connections', 'pid', 'client_properties', '--quiet', '--no-table-headers').split(
    '\n',
  );
  let closed = 0;
  for (const line of lines) {
    const [pid, props] = line.split('\t');
    if (pid === undefined || props === undefined) continue;
    const name = /\{"connection_name","([^"]*)"\}/.exec(props)?.[1];
    if (name?.includes(fragment)) {
      ctl('close_connection', pid, 'fault test: forced close');
      closed++;
    }
  }
  return closed;
}

export function stopBroker(): void {
  ctl('stop_app');
}

export function startBroker(): void {
  ctl('start_app');
  ctl('await_startup', '--timeout', '120');
}
