// Tracing with OpenTelemetry (README "Tracing"): one span per task, child of the message's
// W3C `traceparent`, exported over OTLP/HTTP. The SDK is imported here only, and this
// module only when OTEL_* asks for tracing (startTracing): a service without it loads
// none of it, and its per-task path asks nothing (the dispatcher has no tracer).
//
// The master creates every span itself from the message's headers: it needs no context
// manager and registers nothing global. The children register the SDK for the task's own
// OpenTelemetry calls (child.ts).
import {
  type Context,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  type TextMapGetter,
  trace,
} from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { resourceFromAttributes } from '@opentelemetry/resources';
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
  type Sampler,
  type SpanExporter,
  TraceIdRatioBasedSampler,
  TracerProvider,
} from '@opentelemetry/sdk-trace';
import { formatTraceparent, type SamplerConfig, type TracingConfig } from './config.ts';
import type { SpanOutcome, TaskMessage, TaskSpan, TaskTracer } from './task-tracer.ts';

const getter: TextMapGetter<Record<string, unknown> | undefined> = {
  keys: (carrier) => (carrier === undefined ? [] : Object.keys(carrier)),
  get: (carrier, key) => {
    if (carrier === undefined || !Object.hasOwn(carrier, key)) return undefined;
    const value = carrier[key];
    if (typeof value === 'string') return value;
    return Buffer.isBuffer(value) ? value.toString('latin1') : undefined;
  },
};

export function samplerOf({ name, ratio }: SamplerConfig): Sampler {
  const base = name.replace(/^parentbased_/, '');
  const root =
    base === 'always_off'
      ? new AlwaysOffSampler()
      : base === 'traceidratio'
        ? new TraceIdRatioBasedSampler(ratio)
        : new AlwaysOnSampler();
  return name.startsWith('parentbased_') ? new ParentBasedSampler({ root }) : root;
}

export async function exporterOf(config: TracingConfig): Promise<SpanExporter> {
  const { OTLPTraceExporter } =
    config.protocol === 'http/json'
      ? await import('@opentelemetry/exporter-trace-otlp-http')
      : await import('@opentelemetry/exporter-trace-otlp-proto');
  return new OTLPTraceExporter({ url: config.tracesUrl, timeoutMillis: config.batch.exportTimeoutMillis });
}

export async function providerOf(config: TracingConfig): Promise<TracerProvider> {
  return new TracerProvider({
    resource: resourceFromAttributes({ 'service.name': config.serviceName }),
    sampler: samplerOf(config.sampler),
    spanProcessors: [new BatchSpanProcessor({ exporter: await exporterOf(config), ...config.batch })],
  });
}

class OtelTaskSpan implements TaskSpan {
  readonly #span: Span;
  readonly traceparent: string;
  readonly tracestate: string | undefined;
  readonly traceId: string;
  readonly spanId: string;

  constructor(span: Span) {
    this.#span = span;
    const ctx = span.spanContext();
    this.traceId = ctx.traceId;
    this.spanId = ctx.spanId;
    this.traceparent = formatTraceparent(ctx.traceId, ctx.spanId, (ctx.traceFlags & 1) === 1);
    this.tracestate = ctx.traceState?.serialize() || undefined;
  }

  event(name: string): void {
    this.#span.addEvent(name);
  }

  end(outcome: SpanOutcome | undefined, error?: string): void {
    this.#span.setAttribute('amqp_concurrency.outcome', outcome ?? 'returned');
    if (outcome !== undefined && outcome !== 'succeeded' && outcome !== 'cancelled')
      this.#span.setStatus({
        code: SpanStatusCode.ERROR,
        ...(error === undefined ? {} : { message: error }),
      });
    this.#span.end();
  }
}

class OtelTaskTracer implements TaskTracer {
  readonly #provider: TracerProvider;
  readonly #propagator = new W3CTraceContextPropagator();
  readonly #tracer;

  constructor(provider: TracerProvider) {
    this.#provider = provider;
    this.#tracer = provider.getTracer('amqp-concurrency');
  }

  start(m: TaskMessage): TaskSpan {
    const parent: Context = this.#propagator.extract(ROOT_CONTEXT, m.headers, getter);
    const span = this.#tracer.startSpan(
      m.func,
      {
        kind: SpanKind.CONSUMER,
        // The messaging semantic conventions (RabbitMQ), and the attempt.
        attributes: {
          'messaging.system': 'rabbitmq',
          'messaging.operation.type': 'process',
          'messaging.operation.name': 'process',
          'messaging.destination.name': m.exchange === '' ? m.queue : m.exchange,
          'messaging.rabbitmq.destination.routing_key': m.routingKey,
          'messaging.consumer.group.name': m.queue,
          'messaging.message.body.size': m.bodyBytes,
          ...(m.messageId === undefined ? {} : { 'messaging.message.id': m.messageId }),
          'amqp_concurrency.attempt': m.attempt,
        },
      },
      // A message without a traceparent starts a trace of its own.
      trace.getSpanContext(parent) === undefined ? ROOT_CONTEXT : parent,
    );
    return new OtelTaskSpan(span);
  }

  async shutdown(): Promise<void> {
    await this.#provider.shutdown();
  }
}

/** The task tracer for this configuration (tracingConfig said tracing is on). */
export async function startTracing(config: TracingConfig): Promise<TaskTracer> {
  return new OtelTaskTracer(await providerOf(config));
}
