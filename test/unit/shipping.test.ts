// The shipping files held to the contract, without a Docker engine: they parse, and what
// they name (files, routes, ports, credentials, metrics) is what the service really has.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { ScaledObject, TriggerAuthentication } from '@kubernetes-models/keda/keda.sh/v1alpha1';
import { PodMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { Secret } from 'kubernetes-models/v1/Secret';
import { Service } from 'kubernetes-models/v1/Service';
import pino from 'pino';
import { Registry } from 'prom-client';
import { parseAllDocuments, parse as parseYaml } from 'yaml';
import { OUTCOMES } from '../../src/dispatch/outcome.ts';
import { buildServer, ROUTES } from '../../src/http/server.ts';
import { SERVICE_METRIC_NAMES } from '../../src/metrics/metrics.ts';
import { ROOT } from '../support/helpers.ts';

const read = (path: string) => readFileSync(join(ROOT, path), 'utf8');
// biome-ignore lint/suspicious/noExplicitAny: parsed YAML and JSON documents, walked by known paths
type Obj = Record<string, any>;

const compose = parseYaml(read('docker-compose.yml')) as Obj;
const dockerfile = read('Dockerfile');
const k8s = readdirSync(join(ROOT, 'deploy/kubernetes'))
  .filter((f) => f.endsWith('.yaml'))
  .flatMap((f) => parseAllDocuments(read(`deploy/kubernetes/${f}`)).map((d) => d.toJSON() as Obj));
const deployment = k8s.find((d) => d.kind === 'Deployment') as Obj;
const container = deployment.spec.template.spec.containers[0] as Obj;

function servedRoutes() {
  const app = buildServer({
    health: () => ({
      status: 'ok',
      amqp: { connected: true, blocked: false, paused: false },
      workers: { desired: 1, up: 1, busy: 0 },
      tasksInFlight: 0,
    }),
    status: () => {
      throw new Error('unused');
    },
    setWorkers: () => {},
    cancel: () => 'remembered',
    dead: async () => ({ letters: [], seen: 0, matched: 0, acted: 0, failed: 0, possibleDuplicates: [] }),
    registry: new Registry(),
    requestShutdown: () => {},
    shutdownToken: undefined,
    logger: pino({ level: 'silent' }),
  });
  return app;
}

/** The text of one Dockerfile stage, from its FROM to the next FROM. */
function stage(name: string): string {
  const start = dockerfile.search(new RegExp(`^FROM \\S+ AS ${name}$`, 'm'));
  assert.ok(start >= 0, `the Dockerfile has a ${name} stage`);
  const next = dockerfile.slice(start + 1).search(/^FROM /m);
  return next < 0 ? dockerfile.slice(start) : dockerfile.slice(start, start + 1 + next);
}

/** The init as PID 1: dumb-init in single-child mode, which forwards TTIN/TTOU (tini does not). */
function assertInit(text: string, what: string) {
  const entry = /^ENTRYPOINT (\[.*\])$/m.exec(text)?.[1];
  const argv = JSON.parse(entry ?? '[]') as string[];
  assert.deepEqual(argv.slice(0, 3), ['/usr/bin/dumb-init', '-c', '--'], `${what} runs under dumb-init -c`);
  return argv.slice(3);
}

test('the image: Node.js 24, an init as PID 1, non-root, a HEALTHCHECK on /health/live, SIGTERM, the port', () => {
  const stages = new Set([...dockerfile.matchAll(/^FROM \S+ AS (\S+)/gm)].map((m) => m[1]));
  const images = [...dockerfile.matchAll(/^FROM (\S+)/gm)].map((m) => m[1]).filter((f) => !stages.has(f));
  assert.ok(
    images.length > 0 && images.every((f) => f?.startsWith('node:24')),
    `every base image is Node 24: ${images}`,
  );
  assert.doesNotMatch(dockerfile, /^# *syntax=/m, 'no frontend image to fetch from Docker Hub');
  assert.ok(
    dockerfile.indexOf(' AS runtime') < dockerfile.indexOf(' AS test'),
    'the runtime stage comes first: an in-order builder stops there for target: runtime',
  );
  const runtime = stage('runtime');
  assert.match(runtime, /^USER node$/m);
  assert.match(runtime, /^STOPSIGNAL SIGTERM$/m);
  assert.match(runtime, /^EXPOSE 8080$/m);
  assert.match(runtime, /^HEALTHCHECK .*\n.*\/health\/live/m);
  assert.ok(runtime.includes(ROUTES.live));
  assert.match(dockerfile, /apt-get install .*dumb-init/);
  // In the base stage, so the runtime and the test suite run under the same allocator.
  assert.match(stage('base'), /^ENV MALLOC_MMAP_THRESHOLD_=131072$/m, 'large blocks are unmapped when freed');
  const script = assertInit(runtime, 'the runtime').find((a) => a.endsWith('.ts'));
  assert.ok(script !== undefined && existsSync(join(ROOT, script)), `the entry ${script} exists`);
  assert.match(runtime, /npm ci --omit=dev|--from=deps/);
  for (const [, sources] of dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)) {
    for (const src of (sources as string).split(' '))
      assert.ok(existsSync(join(ROOT, src)), `COPY ${src} exists`);
  }
  const ignored = read('.dockerignore').split('\n');
  assert.ok(ignored.includes('node_modules'));
});

test('the test image has what the suite reads and runs: the shipping files, ps, an init', () => {
  const tests = stage('test');
  const copied = [...tests.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) =>
    (m[1] as string).split(' '),
  );
  const ignored = new Set(read('.dockerignore').split('\n'));
  for (const needed of [
    'docker-compose.yml',
    'Dockerfile',
    '.dockerignore',
    'deploy',
    'docs',
    'src',
    'tasks',
    'test',
  ]) {
    assert.ok(copied.includes(needed), `the test stage copies ${needed}`);
    assert.ok(!ignored.has(needed), `.dockerignore keeps ${needed} in the context`);
  }
  assert.match(tests, /apt-get install .*procps/, 'ps, for the e2e test of a killed master');
  assert.match(tests, /^RUN npm ci --no-audit/m, 'the dev dependencies');
  assert.match(tests, /^USER node$/m);
  assertInit(tests, 'the test image (it reaps the workers of a killed master)');
});

test('compose: RabbitMQ with testuser and a healthcheck, the service waiting for it, the test service', () => {
  const { rabbitmq, test: tests } = compose.services;
  const service = compose.services['amqp-concurrency'];
  assert.equal(rabbitmq.environment.RABBITMQ_DEFAULT_USER, 'testuser');
  assert.equal(rabbitmq.environment.RABBITMQ_DEFAULT_PASS, 'testuser');
  assert.match(rabbitmq.image, /management/);
  assert.ok(rabbitmq.healthcheck.test.length > 0);
  for (const s of [service, tests]) {
    assert.equal(s.depends_on.rabbitmq.condition, 'service_healthy');
    const url = new URL(s.environment.AMQP_URL);
    assert.equal(url.hostname, 'rabbitmq');
    assert.equal(`${url.username}:${url.password}`, 'testuser:testuser');
  }
  assert.equal(service.build.target, 'runtime');
  assert.equal(tests.build.target, 'test');
  assert.deepEqual(tests.command, ['npm', 'test']);
  assert.deepEqual(tests.profiles, ['test'], 'not started by a plain `docker compose up`');
  assert.ok(service.environment.SHUTDOWN_TOKEN);
  const port = String(service.environment.HTTP_PORT);
  // Loopback unless BIND_ADDRESS says otherwise; each host port movable by its variable.
  const published = (s: Obj) =>
    (s.ports as string[]).map((p) => {
      const m = /^\$\{BIND_ADDRESS:-127\.0\.0\.1\}:\$\{[A-Z_]+_HOST_PORT:-(\d+)\}:(\d+)$/.exec(p);
      assert.ok(m, `${p} binds 127.0.0.1 by default, its host port from a variable`);
      return { host: m[1], container: m[2] };
    });
  assert.deepEqual(published(service), [{ host: port, container: port }]);
  assert.deepEqual(
    published(rabbitmq).map((p) => p.container),
    ['5672', '15672'],
  );
  for (const name of ['prometheus', 'grafana']) published(compose.services[name]);
  assert.equal(service.restart, 'on-failure', 'a graceful exit 0 (POST /shutdown) stays stopped');
  const grace = Number(String(service.stop_grace_period).replace(/s$/, ''));
  assert.ok(grace > Number(service.environment.SHUTDOWN_TIMEOUT), 'Docker waits longer than the drain');
  for (const name of ['prometheus', 'grafana'])
    assert.deepEqual(compose.services[name].profiles, ['monitoring']);
  for (const volume of [...compose.services.prometheus.volumes, ...compose.services.grafana.volumes]) {
    assert.ok(existsSync(join(ROOT, volume.split(':')[0])), `${volume} exists`);
  }
  const scrape = parseYaml(read('deploy/prometheus/prometheus.yml')) as Obj;
  assert.deepEqual(scrape.scrape_configs[0].static_configs[0].targets, [`amqp-concurrency:${port}`]);
  assert.equal(scrape.scrape_configs[0].metrics_path, ROUTES.metrics);
});

test('the alert rules pass their promtool unit tests', (t) => {
  if (spawnSync('promtool', ['--version'], { stdio: 'ignore' }).status !== 0) {
    t.skip('promtool is not installed (Debian: apt-get install prometheus)');
    return;
  }
  for (const args of [
    ['check', 'rules', 'deploy/prometheus/alerts.yml'],
    ['test', 'rules', 'deploy/prometheus/alerts.test.yml'],
  ]) {
    const run = spawnSync('promtool', args, { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
    assert.equal(run.status, 0, `promtool ${args.join(' ')}\n${run.stdout}${run.stderr}`);
  }
});

test('Kubernetes: probes on routes the server really serves, on the container port; grace past the drain', async () => {
  const app = servedRoutes();
  await app.ready();
  const live = container.livenessProbe.httpGet;
  const ready = container.readinessProbe.httpGet;
  assert.equal(live.path, ROUTES.live);
  assert.equal(ready.path, ROUTES.ready);
  for (const path of [live.path, ready.path]) {
    assert.equal((await app.inject({ method: 'GET', url: path })).statusCode, 200, `${path} is served`);
  }
  const port = container.ports.find((p: Obj) => p.name === live.port);
  assert.equal(port.containerPort, 8080);
  const env = Object.fromEntries(container.env.map((e: Obj) => [e.name, e.value]));
  assert.equal(Number(env.HTTP_PORT), port.containerPort);
  const annotations = deployment.spec.template.metadata.annotations;
  assert.equal(annotations['prometheus.io/port'], String(port.containerPort));
  assert.equal(annotations['prometheus.io/path'], ROUTES.metrics);
  const preStop = container.lifecycle.preStop.sleep?.seconds ?? 0;
  assert.ok(
    deployment.spec.template.spec.terminationGracePeriodSeconds > Number(env.SHUTDOWN_TIMEOUT) + preStop,
  );
  assert.equal(container.securityContext.readOnlyRootFilesystem, true);
  assert.equal(container.securityContext.allowPrivilegeEscalation, false);
  assert.equal(deployment.spec.template.spec.securityContext.runAsNonRoot, true);
  const secret = k8s.find((d) => d.kind === 'Secret') as Obj;
  assert.ok(secret.stringData.AMQP_URL && secret.stringData.SHUTDOWN_TOKEN);
  assert.equal(container.envFrom[0].secretRef.name, secret.metadata.name);
  const scaled = k8s.find((d) => d.kind === 'ScaledObject') as Obj;
  assert.equal(scaled.spec.triggers[0].type, 'rabbitmq');
  assert.equal(scaled.spec.scaleTargetRef.name, deployment.metadata.name);
  await app.close();
});

// The schemas of the APIs the manifests are for: Kubernetes' own OpenAPI and the KEDA and
// prometheus-operator CRDs, compiled into maintained packages (kubernetes-models), so the
// check needs no network (kubeconform fetches its schemas, and Debian does not package it).
// Like the API server's default validation, unknown fields are not flagged; types, required
// fields, formats and enums are.
const SCHEMAS = [Deployment, Service, Secret, ScaledObject, TriggerAuthentication, PodMonitor];
function validateManifest(doc: Obj): void {
  const Model = SCHEMAS.find((m) => m.apiVersion === doc.apiVersion && m.kind === doc.kind);
  if (!Model) throw new Error(`no schema for ${doc.apiVersion} ${doc.kind}`);
  // biome-ignore lint/suspicious/noExplicitAny: each model takes its own kind's shape; doc is parsed YAML
  new Model(doc as any).validate();
}

test('the Kubernetes manifests validate against the Kubernetes, KEDA and prometheus-operator schemas', () => {
  assert.deepEqual(k8s.map((d) => d.kind).sort(), [
    'Deployment',
    'PodMonitor',
    'ScaledObject',
    'Secret',
    'Service',
    'TriggerAuthentication',
  ]);
  for (const doc of k8s) {
    assert.doesNotThrow(() => validateManifest(doc), `${doc.kind} ${doc.metadata?.name}`);
  }
});

test('the schema check refuses what the API server would: a wrong type, a missing field, a bad enum, an unknown kind', () => {
  const portByName = structuredClone(deployment);
  portByName.spec.template.spec.containers[0].ports[0].containerPort = 'http';
  assert.throws(() => validateManifest(portByName), /containerPort must be integer/);
  const misspelled = structuredClone(deployment);
  misspelled.spec.template.spec.contianers = misspelled.spec.template.spec.containers;
  delete misspelled.spec.template.spec.containers;
  assert.throws(() => validateManifest(misspelled), /spec must have required property containers/);
  const podMonitor = structuredClone(k8s.find((d) => d.kind === 'PodMonitor') as Obj);
  podMonitor.spec.podMetricsEndpoints[0].scheme = 'gopher';
  assert.throws(() => validateManifest(podMonitor), /scheme must be equal to one of the allowed values/);
  const scaled = structuredClone(k8s.find((d) => d.kind === 'ScaledObject') as Obj);
  scaled.spec.triggers[0].metadata = 'queueName=x';
  assert.throws(() => validateManifest(scaled), /triggers\/0\/metadata must be object/);
  assert.throws(() => validateManifest({ ...deployment, apiVersion: 'extensions/v1beta1' }), /no schema for/);
});

test('the dashboard and the alerts use only metrics and label values the service exports', () => {
  const texts = [
    read('deploy/grafana/dashboards/amqp-concurrency.json'),
    read('deploy/prometheus/alerts.yml'),
  ];
  const dashboard = JSON.parse(texts[0] as string) as Obj;
  assert.ok(dashboard.panels.length >= 8);
  const known = new Set(SERVICE_METRIC_NAMES);
  const used = new Set<string>();
  for (const text of texts) {
    for (const [name] of text.matchAll(/amqp_concurrency_[a-z_]+/g))
      used.add(name.replace(/_(bucket|sum|count)$/, ''));
  }
  for (const name of used) assert.ok(known.has(name), `${name} is exported`);
  for (const needed of [
    'amqp_concurrency_tasks_total',
    'amqp_concurrency_task_duration_seconds',
    'amqp_concurrency_workers',
    'amqp_concurrency_worker_restarts_total',
    'amqp_concurrency_messages_dead_lettered_total',
    'amqp_concurrency_amqp_connected',
  ]) {
    assert.ok(used.has(needed), `${needed} is charted or watched`);
  }
  const values = new Set<string>([...OUTCOMES, 'idle', 'busy', 'timeout', 'crash', 'recycle']);
  for (const text of texts) {
    for (const [, list] of text.matchAll(/(?:outcome|state|reason)=~?\\?"([^"\\]+)\\?"/g)) {
      for (const v of (list as string).split('|'))
        assert.ok(values.has(v), `label value ${v} is one the service uses`);
    }
  }
});
