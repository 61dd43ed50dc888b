// `docker compose up` and `docker compose run --rm test` on a real engine, as a user runs
// them: build, up, healthy, non-root under an init, the HTTP routes, the seed's message,
// signals, the monitoring profile, a graceful stop, POST /shutdown, and the test service.
//
//   COMPOSE_EXTRA_FILES=../shared/container-lab/compose.override.yml npm run test:compose
//
// COMPOSE_EXTRA_FILES: extra compose files after docker-compose.yml (path-delimiter
// separated, relative to the project root). Skips, in one line, when `docker info` fails.
// Builds use the classic builder (DOCKER_BUILDKIT=0). Each run is its own compose project,
// removed with its volumes at the end; the built images keep fixed names
// (amqp-concurrency-compose-test:runtime/test) so the next run reuses the layer cache.
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import amqp from 'amqplib';
import { parse as parseYaml } from 'yaml';

interface Alerts {
  groups: { name: string; rules: { alert: string }[] }[];
}

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const MINUTE = 60_000;

const engine = spawnSync('docker', ['info'], { stdio: 'ignore', timeout: 30_000 }).status === 0;
const skip = engine ? false : 'no Docker engine (`docker info` failed): compose test skipped';

const project = `amqpc-compose-${process.pid}`;
const token = randomUUID();
const env = { ...process.env, DOCKER_BUILDKIT: '0', COMPOSE_DOCKER_CLI_BUILD: '0', SHUTDOWN_TOKEN: token };
const scratch = mkdtempSync(join(tmpdir(), 'amqpc-compose-'));
const imagesFile = join(scratch, 'images.yml');
process.once('exit', () => rmSync(scratch, { recursive: true, force: true }));
writeFileSync(
  imagesFile,
  [
    'services:',
    '  amqp-concurrency: { image: "amqp-concurrency-compose-test:runtime" }',
    '  test: { image: "amqp-concurrency-compose-test:test" }',
    '',
  ].join('\n'),
);
const files = [
  'docker-compose.yml',
  ...(process.env.COMPOSE_EXTRA_FILES ?? '')
    .split(delimiter)
    .filter(Boolean)
    .map((f) => resolve(ROOT, f)),
  imagesFile,
];
const base = ['compose', '--project-directory', ROOT, '-p', project, ...files.flatMap((f) => ['-f', f])];

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a docker command; fails (with its output) unless it exits 0 or `allowFail`. */
function docker(args: string[], { timeoutMs = 2 * MINUTE, allowFail = false } = {}): Promise<Run> {
  return new Promise((done, fail) => {
    execFile(
      'docker',
      args,
      { cwd: ROOT, env, timeout: timeoutMs, maxBuffer: 256 * 1024 * 1024, killSignal: 'SIGKILL' },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
        if (code !== 0 && !allowFail) {
          const tail = (s: string) => s.split('\n').slice(-80).join('\n');
          fail(new Error(`docker ${args.join(' ')} -> ${code}\n${tail(stdout)}\n${tail(stderr)}`));
        } else done({ code, stdout, stderr });
      },
    );
  });
}
const compose = (args: string[], options?: { timeoutMs?: number; allowFail?: boolean }) =>
  docker([...base, ...args], options);

async function waitFor<T>(what: string, check: () => T | Promise<T>, timeoutMs = 2 * MINUTE) {
  const start = performance.now();
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value) return value as NonNullable<T>;
    } catch (error) {
      last = error;
    }
    if (performance.now() - start > timeoutMs)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last}` : ''}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const containerId = async (service: string) =>
  (await compose(['ps', '-a', '-q', service])).stdout.trim().split('\n')[0] ?? '';

interface State {
  Status: string;
  ExitCode: number;
  Health?: { Status: string };
}
async function inspect(service: string): Promise<{ State: State; RestartCount: number }> {
  const id = await containerId(service);
  assert.ok(id, `${service} has a container`);
  return JSON.parse((await docker(['inspect', '--format', '{{json .}}', id])).stdout);
}

/** The host address of a published port, from `docker compose port` (honours the overrides). */
async function published(service: string, port: number): Promise<string> {
  const out = (await compose(['port', service, String(port)])).stdout.trim();
  assert.match(out, /:\d+$/, `${service}:${port} is published`);
  return out.replace(/^0\.0\.0\.0:/, '127.0.0.1:');
}

const healthy = (service: string) =>
  waitFor(
    `${service} healthy`,
    async () => (await inspect(service)).State.Health?.Status === 'healthy',
    3 * MINUTE,
  );

let http = '';
const get = (path: string, headers: Record<string, string> = {}) =>
  fetch(`${http}${path}`, { headers, signal: AbortSignal.timeout(10_000) });
async function health(): Promise<{ status: string; workers: { desired: number; up: number } }> {
  return (await get('/health')).json() as never;
}
async function metric(name: string, labels: Record<string, string>): Promise<number> {
  const text = await (await get('/metrics')).text();
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`)))
      total += Number(line.split(' ').at(-1));
  }
  return total;
}

async function publish(body: unknown) {
  const connection = await amqp.connect(`amqp://testuser:testuser@${await published('rabbitmq', 5672)}/`);
  try {
    const channel = await connection.createConfirmChannel();
    channel.publish('curio_amqp_exchange', 'curio_amqp', Buffer.from(JSON.stringify(body)), {
      persistent: true,
      mandatory: true,
      messageId: randomUUID(),
    });
    await channel.waitForConfirms();
  } finally {
    await connection.close();
  }
}

const down = ['--profile', 'test', '--profile', 'monitoring', 'down', '-v', '--remove-orphans'];
// Interrupted (Ctrl-C, a CI timeout): the after hook would not run, so take the project down here.
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    if (engine)
      spawnSync('docker', [...base, ...down], { cwd: ROOT, env, stdio: 'ignore', timeout: 2 * MINUTE });
    process.exit(130);
  });
}

describe('docker compose, on a real engine', { skip }, () => {
  before(async () => {
    // Leftovers of an earlier run that was killed: none share this project name.
    await compose(['--profile', 'test', '--profile', 'monitoring', 'down', '-v'], { allowFail: true });
  });
  after(async () => {
    if (process.env.COMPOSE_KEEP !== '1') {
      await compose(down, { timeoutMs: 5 * MINUTE, allowFail: true });
    }
  });

  test('builds the runtime and the test image (classic builder)', async () => {
    const images = ['amqp-concurrency-compose-test:runtime', 'amqp-concurrency-compose-test:test'];
    const ids = async () =>
      Promise.all(
        images.map(async (i) =>
          (await docker(['image', 'inspect', '-f', '{{.Id}}', i], { allowFail: true })).stdout.trim(),
        ),
      );
    // The container lab's RabbitMQ stand-in is 4.0.5, built as rabbitmq:4-management; the
    // compose file pins the minor it was tested with. Give the stand-in that name too.
    const pinned = 'rabbitmq:4.0-management';
    if ((await docker(['image', 'inspect', pinned], { allowFail: true })).code !== 0)
      await docker(['tag', 'rabbitmq:4-management', pinned], { allowFail: true });
    const before = await ids();
    await compose(['--profile', 'test', 'build', 'amqp-concurrency', 'test'], { timeoutMs: 30 * MINUTE });
    // The images this build replaced would pile up untagged, run after run: remove them.
    const after = await ids();
    for (const [i, id] of before.entries()) {
      if (id && id !== after[i]) await docker(['rmi', id], { allowFail: true });
    }
  });

  test('up: RabbitMQ healthy first, then the service healthy, its ports on loopback', async (t) => {
    const started = performance.now();
    await compose(['up', '-d', 'amqp-concurrency'], { timeoutMs: 10 * MINUTE });
    assert.equal((await inspect('rabbitmq')).State.Health?.Status, 'healthy', 'depends_on waited for it');
    const up = performance.now();
    await healthy('amqp-concurrency');
    t.diagnostic(`healthy ${Math.round(performance.now() - up)} ms after up returned`);
    t.diagnostic(`up to healthy: ${Math.round(performance.now() - started)} ms`);
    http = `http://${await published('amqp-concurrency', 8080)}`;
    for (const [service, port] of [
      ['amqp-concurrency', 8080],
      ['rabbitmq', 5672],
      ['rabbitmq', 15672],
    ] as const) {
      assert.match(await published(service, port), /^127\.0\.0\.1:/, `${service}:${port} on loopback`);
    }
  });

  test('runs as the non-root node user, its master a child of an init as PID 1', async () => {
    const script = `
      const fs = require('node:fs');
      const ps = fs.readdirSync('/proc').filter((d) => /^\\d+$/.test(d)).map((pid) => {
        try {
          const status = fs.readFileSync('/proc/' + pid + '/status', 'utf8');
          const field = (k) => status.match(new RegExp('^' + k + ':\\\\s+(\\\\d+)', 'm'))[1];
          const cmd = fs.readFileSync('/proc/' + pid + '/cmdline', 'utf8').split('\\0').filter(Boolean);
          return { pid: +pid, ppid: +field('PPid'), uid: +field('Uid'), cmd };
        } catch { return null; }
      }).filter(Boolean);
      console.log(JSON.stringify(ps));`;
    const { stdout } = await compose(['exec', '-T', 'amqp-concurrency', 'node', '-e', script]);
    const ps = JSON.parse(stdout) as { pid: number; ppid: number; uid: number; cmd: string[] }[];
    const init = ps.find((p) => p.pid === 1);
    assert.ok(init, 'PID 1 is there');
    assert.match(
      init.cmd[0] ?? '',
      /(dumb-init|tini|docker-init)$/,
      `PID 1 is an init: ${init.cmd.join(' ')}`,
    );
    const master = ps.find((p) => p.ppid === 1 && p.cmd.some((a) => a.endsWith('src/cli/main.ts')));
    assert.ok(master, `the master runs under PID 1: ${JSON.stringify(ps)}`);
    const workers = ps.filter((p) => p.ppid === master.pid);
    assert.ok(workers.length >= 1, 'the master has its workers');
    for (const p of [init, master, ...workers]) assert.equal(p.uid, 1000, `${p.cmd.join(' ')} runs as node`);
  });

  test('/health, /health/ready and /metrics answer', async () => {
    const h = await get('/health');
    assert.equal(h.status, 200);
    assert.equal(((await h.json()) as { status: string }).status, 'ok');
    assert.equal((await get('/health/ready')).status, 200);
    assert.equal((await get('/health/live')).status, 200);
    const m = await get('/metrics');
    assert.equal(m.status, 200);
    assert.match(await m.text(), /^amqp_concurrency_workers\{/m);
  });

  test('the seed message {"func":"test","args":[1,2]} published into the compose RabbitMQ runs', async () => {
    const labels = { func: 'test', outcome: 'succeeded' };
    const before = await metric('amqp_concurrency_tasks_total', labels);
    await publish({ func: 'test', args: [1, 2] });
    await waitFor('tasks_total{func="test",outcome="succeeded"} to grow', async () => {
      return (await metric('amqp_concurrency_tasks_total', labels)) === before + 1;
    });
  });

  test('docker kill --signal TTIN adds a worker, TTOU removes one, HUP reloads', async () => {
    const start = (await health()).workers.desired;
    await compose(['kill', '-s', 'SIGTTIN', 'amqp-concurrency']);
    await waitFor(`${start + 1} workers up`, async () => {
      const { workers } = await health();
      return workers.desired === start + 1 && workers.up === start + 1;
    });
    await compose(['kill', '-s', 'SIGTTOU', 'amqp-concurrency']);
    await waitFor(`${start} workers up`, async () => {
      const { workers } = await health();
      return workers.desired === start && workers.up === start;
    });
    const pids = async () => {
      const status = await get('/status', { authorization: `Bearer ${token}` });
      return ((await status.json()) as { workers: { pid: number }[] }).workers.map((w) => w.pid);
    };
    const old = await pids();
    await compose(['kill', '-s', 'SIGHUP', 'amqp-concurrency']);
    await waitFor('every worker replaced by the reload', async () => {
      const now = await pids();
      return now.length === start && now.every((pid) => !old.includes(pid));
    });
    assert.equal((await inspect('amqp-concurrency')).State.Status, 'running');
    assert.equal((await get('/health')).status, 200);
  });

  test('the monitoring profile: Prometheus loads the alert rules and its scrape target is up', async () => {
    await compose(['--profile', 'monitoring', 'up', '-d', '--no-deps', 'prometheus'], {
      timeoutMs: 5 * MINUTE,
    });
    const prometheus = `http://${await published('prometheus', 9090)}`;
    const api = async (path: string) =>
      // biome-ignore lint/suspicious/noExplicitAny: Prometheus' JSON API, read by known paths
      ((await (await fetch(`${prometheus}${path}`, { signal: AbortSignal.timeout(10_000) })).json()) as any)
        .data;
    const alerts = (parseYaml(readFileSync(join(ROOT, 'deploy/prometheus/alerts.yml'), 'utf8')) as Alerts)
      .groups;
    const expected = alerts.flatMap((g) => g.rules.map((r) => r.alert)).sort();
    // A rule's health is "unknown" until its first evaluation: wait for every one to be "ok".
    await waitFor(`the rules ${expected.join(', ')} loaded and evaluated`, async () => {
      const { groups } = (await api('/api/v1/rules')) as {
        groups: { rules: { name: string; health: string }[] }[];
      };
      const rules = groups.flatMap((g) => g.rules);
      return (
        JSON.stringify(rules.map((r) => r.name).sort()) === JSON.stringify(expected) &&
        rules.every((r) => r.health === 'ok')
      );
    });
    await waitFor('the scrape target up', async () => {
      const { activeTargets } = await api('/api/v1/targets');
      return activeTargets.some(
        (x: { labels: { job: string }; health: string }) =>
          x.labels.job === 'amqp-concurrency' && x.health === 'up',
      );
    });
    await compose(['--profile', 'monitoring', 'stop', 'prometheus']);
  });

  test('docker compose stop drains: the running task finishes, exit 0 before the grace period', async () => {
    await publish({ func: 'sleep', args: [3] });
    await waitFor(
      'the sleep task running',
      async () => (await metric('amqp_concurrency_tasks_in_flight', {})) === 1,
    );
    const started = performance.now();
    await compose(['stop', 'amqp-concurrency'], { timeoutMs: 3 * MINUTE });
    const took = performance.now() - started;
    const { State } = await inspect('amqp-concurrency');
    assert.equal(State.Status, 'exited');
    assert.equal(State.ExitCode, 0, 'a drain, not a SIGKILL (137)');
    assert.ok(took < 40_000, `stopped in ${Math.round(took)} ms, within stop_grace_period`);
    const logs = (await compose(['logs', '--no-color', 'amqp-concurrency'])).stdout;
    assert.match(logs, /"func":"sleep".*"outcome":"succeeded"|"outcome":"succeeded".*"func":"sleep"/);
  });

  test('POST /shutdown with the token: exit 0, and the container stays stopped', async () => {
    await compose(['start', 'amqp-concurrency'], { timeoutMs: 5 * MINUTE });
    await healthy('amqp-concurrency');
    const shutdown = (authorization?: string) =>
      fetch(`${http}/shutdown`, {
        method: 'POST',
        headers: authorization ? { authorization } : {},
        signal: AbortSignal.timeout(10_000),
      });
    assert.equal((await shutdown('Bearer wrong')).status, 401);
    assert.equal((await shutdown(`Bearer ${token}`)).status, 202);
    const exited = await waitFor('the container to exit', async () => {
      const { State, RestartCount } = await inspect('amqp-concurrency');
      return State.Status === 'exited' ? { State, RestartCount } : undefined;
    });
    assert.equal(exited.State.ExitCode, 0);
    // `restart: unless-stopped` restarted it about 1.5 s after the exit: give a restart
    // policy ample time to act, then look again.
    await new Promise((r) => setTimeout(r, 8_000));
    const later = await inspect('amqp-concurrency');
    assert.equal(later.State.Status, 'exited', 'not restarted');
    assert.equal(later.RestartCount, 0);
  });

  test('docker compose run --rm test: the suite passes inside the test image against the compose RabbitMQ', async (t) => {
    const started = performance.now();
    const run = await compose(['--profile', 'test', 'run', '--rm', '-T', 'test'], {
      timeoutMs: 45 * MINUTE,
      allowFail: true,
    });
    const summary = run.stdout
      .split('\n')
      .filter((l) => /^\s*ℹ (tests|pass|fail|skipped|duration_ms)/.test(l) || /^\s*✖ /.test(l));
    for (const line of summary) t.diagnostic(line.trim());
    t.diagnostic(`run --rm test: ${Math.round((performance.now() - started) / 1000)} s`);
    if (run.code !== 0) {
      const tail = (s: string) => s.split('\n').slice(-150).join('\n');
      assert.fail(
        `docker compose run --rm test exited ${run.code}\n${tail(run.stdout)}\n${tail(run.stderr)}`,
      );
    }
  });
});
