// Tracing against the real CLI, broker and an OTLP/HTTP receiver of our own in this
// process (README "Tracing"): a span per task, child of the message's traceparent; the
// task sees its span and its own spans are children of it; replies and dead letters
// carry the trace on; a message without a traceparent starts its own trace.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { freshName, spawnCli, startCliService, waitFor } from '../support/helpers.ts';

const TASKS = new URL('../fixtures/controlled-tasks.ts', import.meta.url).pathname;

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  kind: number;
  attributes: { key: string; value: Record<string, unknown> }[];
  events?: { name: string }[];
  status?: { code?: number; message?: string };
}

/** An OTLP/HTTP (JSON) traces receiver: every span it got, with its resource's service name. */
async function receiver(t: TestContext) {
  const spans: (OtlpSpan & { service: string | undefined })[] = [];
  const server = createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8').on('data', (d: string) => {
      body += d;
    });
    req.on('end', () => {
      const parsed = JSON.parse(body) as {
        resourceSpans: {
          resource: { attributes: { key: string; value: { stringValue?: string } }[] };
          scopeSpans: { spans: OtlpSpan[] }[];
        }[];
      };
      for (const rs of parsed.resourceSpans) {
        const service = rs.resource.attributes.find((a) => a.key === 'service.name')?.value.stringValue;
        for (const ss of rs.scopeSpans) for (const span of ss.spans) spans.push({ ...span, service });
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  return { spans, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

const attr = (span: OtlpSpan, key: string) => {
  const value = span.attributes.find((a) => a.key === key)?.value;
  return value === undefined ? undefined : (Object.values(value)[0] as unknown);
};

test('one span per task, child of the message traceparent; the task sees it; replies and dead letters carry it on', async (t) => {
  const { spans, url } = await receiver(t);
  const queue = freshName(t);
  const { b } = await startCliService(t, queue, ['--task-path', TASKS], {
    OTEL_EXPORTER_OTLP_ENDPOINT: url,
    OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
    OTEL_SERVICE_NAME: 'tracing-test',
    OTEL_BSP_SCHEDULE_DELAY: '100',
  });
  const parentTrace = '4bf92f3577b34da6a3ce929d0e0e4736';
  const parentSpan = '00f067aa0ba902b7';
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(
    queue,
    { func: 'traced' },
    {
      messageId: 'traced-1',
      replyTo: replies.queue,
      correlationId: 'c1',
      headers: { traceparent: `00-${parentTrace}-${parentSpan}-01` },
    },
  );
  await b.send(
    queue,
    // `buggy` fails while its third argument names no file: a fresh name that nothing makes.
    { func: 'buggy', args: ['/dev/null', 'x', join(tmpdir(), `amqpc-absent-${randomUUID()}`)] },
    {
      messageId: 'failing-1',
      headers: { traceparent: `00-${parentTrace}-${parentSpan}-01` },
    },
  );
  await b.send(queue, { func: 'note', args: ['/dev/null', 'orphan'] }, { messageId: 'no-parent' });

  const [reply] = await b.take(replies.queue, 1, 30_000);
  const [dead] = await b.take(`${queue}.dead`, 1, 30_000);
  await waitFor('the spans', () => spans.filter((s) => s.service === 'tracing-test').length >= 4, 30_000);
  const byId = (id: string) => spans.find((s) => attr(s, 'messaging.message.id') === id) as OtlpSpan;

  const ok = byId('traced-1');
  assert.equal(ok.name, 'traced');
  assert.equal(ok.traceId, parentTrace);
  assert.equal(ok.parentSpanId, parentSpan);
  assert.equal(ok.kind, 5, 'a consumer span');
  assert.equal(attr(ok, 'messaging.system'), 'rabbitmq');
  assert.equal(attr(ok, 'messaging.operation.type'), 'process');
  assert.equal(attr(ok, 'messaging.consumer.group.name'), queue);
  assert.equal(Number(attr(ok, 'amqp_concurrency.attempt')), 1);
  assert.deepEqual(
    ok.events?.map((e) => e.name),
    ['queued', 'started', 'settled'],
  );
  assert.notEqual(ok.status?.code, 2);
  const own = `00-${parentTrace}-${ok.spanId}-01`;
  // The task saw its own span, and the reply carries it.
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: own });
  assert.equal(reply?.properties.headers?.traceparent, own);
  // The task's own span, made with the API in the worker, is a child of it.
  await waitFor('the task code span', () => spans.some((s) => s.name === 'inner work'), 30_000);
  const inner = spans.find((s) => s.name === 'inner work') as OtlpSpan & { service?: string };
  assert.equal(inner.traceId, parentTrace);
  assert.equal(inner.parentSpanId, ok.spanId);

  const failed = byId('failing-1');
  assert.equal(failed.status?.code, 2, 'status ERROR');
  assert.match(String(failed.status?.message), /hit the bug/);
  assert.equal(dead?.properties.headers?.traceparent, `00-${parentTrace}-${failed.spanId}-01`);

  const orphan = byId('no-parent');
  assert.notEqual(orphan.traceId, parentTrace, 'a trace of its own');
  assert.ok(orphan.parentSpanId === undefined || orphan.parentSpanId === '');
});

test('http/protobuf, the default protocol, posts protobuf to the traces endpoint; without OTEL_* no SDK is loaded', async (t) => {
  const got: { path: string | undefined; type: string | undefined; bytes: number }[] = [];
  const server = createServer((req, res) => {
    let bytes = 0;
    req.on('data', (d: Buffer) => {
      bytes += d.length;
    });
    req.on('end', () => {
      got.push({ path: req.url, type: req.headers['content-type'], bytes });
      res.writeHead(200).end();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  const queue = freshName(t);
  const { b, cli } = await startCliService(t, queue, ['--task-path', TASKS], {
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `http://127.0.0.1:${(server.address() as AddressInfo).port}/custom/traces`,
    OTEL_BSP_SCHEDULE_DELAY: '100',
  });
  await b.send(queue, { func: 'note', args: ['/dev/null', 'x'] });
  await waitFor('an export', () => got.length > 0, 30_000);
  assert.equal(got[0]?.path, '/custom/traces');
  assert.equal(got[0]?.type, 'application/x-protobuf');
  assert.ok((got[0]?.bytes as number) > 0);
  assert.ok(cli.logs().some((l) => l.msg === 'tracing: one span per task'));
  await waitFor('the task line', () => cli.logs().some((l) => l.msg === 'task succeeded'));
  const line = cli.logs().find((l) => l.msg === 'task succeeded') as Record<string, unknown>;
  assert.match(String(line.trace_id), /^[0-9a-f]{32}$/, 'log lines about a task carry its trace');
  assert.match(String(line.span_id), /^[0-9a-f]{16}$/);

  const plainQueue = freshName({ name: `${t.name} plain` });
  const plain = await startCliService(t, plainQueue, ['--task-path', TASKS]);
  await plain.b.send(plainQueue, { func: 'note', args: ['/dev/null', 'y'] });
  await waitFor('the plain task line', () => plain.cli.logs().some((l) => l.msg === 'task succeeded'));
  assert.ok(!plain.cli.logs().some((l) => l.msg === 'tracing: one span per task' || 'trace_id' in l));
});

test('an OTEL_* value that cannot be used stops start-up: exit 2, one line naming it', async (t) => {
  const cli = spawnCli(t, ['--queue', freshName(t), '--http-port', '0'], {
    OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318',
    OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc',
  });
  assert.equal((await cli.exit).code, 2);
  assert.match(
    cli.stderr(),
    /^amqp-concurrency: OTEL_EXPORTER_OTLP_PROTOCOL: http\/protobuf or http\/json .*grpc is not supported\)\n$/,
  );
});
