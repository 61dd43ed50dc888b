// Whether tracing is on, and how, from the standard OpenTelemetry environment variables
// (README "Tracing"). Pure, so that every rule is a unit test; the SDK is loaded only when
// this says tracing is on (tracing.ts), so a service without OTEL_* pays nothing for it.
//
// SDK 3.x no longer reads the sampler and batch variables itself: they are read here.

export type OtlpProtocol = 'http/protobuf' | 'http/json';

export interface SamplerConfig {
  /** always_on, always_off, traceidratio, and each of them parentbased_. */
  name: string;
  ratio: number;
}

export interface TracingConfig {
  /** Where spans are POSTed (OTLP/HTTP): the traces endpoint itself. */
  tracesUrl: string;
  protocol: OtlpProtocol;
  serviceName: string;
  sampler: SamplerConfig;
  batch: {
    scheduledDelayMillis: number;
    maxQueueSize: number;
    maxExportBatchSize: number;
    exportTimeoutMillis: number;
  };
}

const SAMPLERS = [
  'always_on',
  'always_off',
  'traceidratio',
  'parentbased_always_on',
  'parentbased_always_off',
  'parentbased_traceidratio',
];

type Env = Readonly<Record<string, string | undefined>>;

function positive(env: Env, name: string, fallback: number): number {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0)
    throw new Error(`${name}: must be a number greater than 0 (got ${JSON.stringify(raw)})`);
  return n;
}

/**
 * The tracing settings, or undefined when tracing is off (neither OTLP endpoint is set, or
 * OTEL_SDK_DISABLED is true, or OTEL_TRACES_EXPORTER is none). Throws, with one line
 * naming the variable, for a value that cannot be used.
 */
export function tracingConfig(env: Env): TracingConfig | undefined {
  if (env.OTEL_SDK_DISABLED?.trim().toLowerCase() === 'true') return undefined;
  if (env.OTEL_TRACES_EXPORTER?.trim().toLowerCase() === 'none') return undefined;
  const traces = env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT?.trim();
  const base = env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim();
  if (!traces && !base) return undefined;
  // The per-signal endpoint is used as it is; the base one gets the signal's path.
  const tracesUrl = traces ? traces : `${(base as string).replace(/\/+$/, '')}/v1/traces`;
  try {
    const url = new URL(tracesUrl);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error('not http');
  } catch {
    throw new Error(
      `${traces ? 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT' : 'OTEL_EXPORTER_OTLP_ENDPOINT'}: must be an http:// or https:// URL (got ${JSON.stringify(traces || base)})`,
    );
  }
  const protocol = (
    env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ??
    env.OTEL_EXPORTER_OTLP_PROTOCOL ??
    'http/protobuf'
  ).trim();
  if (protocol !== 'http/protobuf' && protocol !== 'http/json')
    throw new Error(
      `OTEL_EXPORTER_OTLP_PROTOCOL: http/protobuf or http/json (got ${JSON.stringify(protocol)}; grpc is not supported)`,
    );
  const samplerName = (env.OTEL_TRACES_SAMPLER ?? 'parentbased_always_on').trim().toLowerCase();
  if (!SAMPLERS.includes(samplerName))
    throw new Error(
      `OTEL_TRACES_SAMPLER: one of ${SAMPLERS.join(', ')} (got ${JSON.stringify(samplerName)})`,
    );
  const ratioRaw = env.OTEL_TRACES_SAMPLER_ARG;
  const ratio = ratioRaw === undefined || ratioRaw.trim() === '' ? 1 : Number(ratioRaw);
  if (!Number.isFinite(ratio) || ratio < 0 || ratio > 1)
    throw new Error(`OTEL_TRACES_SAMPLER_ARG: a ratio from 0 to 1 (got ${JSON.stringify(ratioRaw)})`);
  return {
    tracesUrl,
    protocol,
    serviceName: env.OTEL_SERVICE_NAME?.trim() || 'amqp-concurrency',
    sampler: { name: samplerName, ratio },
    batch: {
      scheduledDelayMillis: positive(env, 'OTEL_BSP_SCHEDULE_DELAY', 5_000),
      maxQueueSize: positive(env, 'OTEL_BSP_MAX_QUEUE_SIZE', 2_048),
      maxExportBatchSize: positive(env, 'OTEL_BSP_MAX_EXPORT_BATCH_SIZE', 512),
      exportTimeoutMillis: positive(env, 'OTEL_BSP_EXPORT_TIMEOUT', 30_000),
    },
  };
}

/** A W3C traceparent of our own spans: version 00, the ids, sampled or not. */
export function formatTraceparent(traceId: string, spanId: string, sampled: boolean): string {
  return `00-${traceId}-${spanId}-${sampled ? '01' : '00'}`;
}

/** A W3C traceparent's ids, or undefined when it is not one (version 00, non-zero ids). */
export function parseTraceparent(
  value: unknown,
): { traceId: string; spanId: string; sampled: boolean } | undefined {
  if (typeof value !== 'string') return undefined;
  const match = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/.exec(value.trim());
  if (match === null || match[1] === 'ff') return undefined;
  const [, , traceId, spanId, flags] = match as unknown as [string, string, string, string, string];
  if (/^0+$/.test(traceId) || /^0+$/.test(spanId)) return undefined;
  return { traceId, spanId, sampled: (Number.parseInt(flags, 16) & 1) === 1 };
}
