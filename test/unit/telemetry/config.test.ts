// When tracing is on and how, from the standard OTEL_* variables; and the traceparent rules.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatTraceparent, parseTraceparent, tracingConfig } from '../../../src/telemetry/config.ts';

test('off unless an OTLP endpoint is set; off when disabled; the traces endpoint beats the base one', () => {
  assert.equal(tracingConfig({}), undefined);
  assert.equal(tracingConfig({ OTEL_SERVICE_NAME: 'x' }), undefined);
  assert.equal(
    tracingConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://c:4318', OTEL_SDK_DISABLED: 'true' }),
    undefined,
  );
  assert.equal(
    tracingConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://c:4318', OTEL_TRACES_EXPORTER: 'none' }),
    undefined,
  );
  const base = tracingConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://c:4318/' });
  assert.equal(base?.tracesUrl, 'http://c:4318/v1/traces');
  assert.equal(base?.protocol, 'http/protobuf');
  assert.equal(base?.serviceName, 'amqp-concurrency');
  assert.deepEqual(base?.sampler, { name: 'parentbased_always_on', ratio: 1 });
  assert.deepEqual(base?.batch, {
    scheduledDelayMillis: 5_000,
    maxQueueSize: 2_048,
    maxExportBatchSize: 512,
    exportTimeoutMillis: 30_000,
  });
  const own = tracingConfig({
    OTEL_EXPORTER_OTLP_ENDPOINT: 'http://c:4318',
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'https://t/x',
    OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
    OTEL_SERVICE_NAME: 'billing',
    OTEL_TRACES_SAMPLER: 'traceidratio',
    OTEL_TRACES_SAMPLER_ARG: '0.25',
    OTEL_BSP_SCHEDULE_DELAY: '200',
  });
  assert.equal(own?.tracesUrl, 'https://t/x');
  assert.equal(own?.protocol, 'http/json');
  assert.equal(own?.serviceName, 'billing');
  assert.deepEqual(own?.sampler, { name: 'traceidratio', ratio: 0.25 });
  assert.equal(own?.batch.scheduledDelayMillis, 200);
});

test('a value that cannot be used is one line naming the variable', () => {
  const on = { OTEL_EXPORTER_OTLP_ENDPOINT: 'http://c:4318' };
  const cases: [Record<string, string>, RegExp][] = [
    [{ OTEL_EXPORTER_OTLP_ENDPOINT: 'c:4318' }, /^OTEL_EXPORTER_OTLP_ENDPOINT: must be an http/],
    [{ ...on, OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' }, /^OTEL_EXPORTER_OTLP_PROTOCOL: .*grpc is not supported/],
    [{ ...on, OTEL_TRACES_SAMPLER: 'sometimes' }, /^OTEL_TRACES_SAMPLER: one of/],
    [{ ...on, OTEL_TRACES_SAMPLER_ARG: '2' }, /^OTEL_TRACES_SAMPLER_ARG: a ratio from 0 to 1/],
    [{ ...on, OTEL_BSP_SCHEDULE_DELAY: '-1' }, /^OTEL_BSP_SCHEDULE_DELAY: must be a number greater than 0/],
  ];
  for (const [env, message] of cases)
    assert.throws(
      () => tracingConfig(env),
      (err: Error) => message.test(err.message),
    );
});

test('traceparent: version 00 out, any version but ff in; zero ids and bad shapes are none', () => {
  const tp = formatTraceparent('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7', true);
  assert.equal(tp, '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
  assert.deepEqual(parseTraceparent(tp), {
    traceId: '4bf92f3577b34da6a3ce929d0e0e4736',
    spanId: '00f067aa0ba902b7',
    sampled: true,
  });
  assert.equal(parseTraceparent(`00-${'0'.repeat(32)}-00f067aa0ba902b7-01`), undefined);
  assert.equal(parseTraceparent('ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'), undefined);
  assert.equal(parseTraceparent('nonsense'), undefined);
  assert.equal(parseTraceparent(5), undefined);
  assert.equal(parseTraceparent('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00')?.sampled, false);
});
