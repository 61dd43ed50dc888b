// Tracing inside a worker (README "Tracing"): the SDK registered globally, so that a task's
// own OpenTelemetry API calls (`trace.getTracer(...).startActiveSpan(...)`) are exported
// as children of the task's span. Loaded by the worker only when OTEL_* asks for tracing.
import { context, propagation, ROOT_CONTEXT, trace } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import type { TracingConfig } from './config.ts';
import { providerOf } from './tracing.ts';

export interface ChildTracing {
  /** Runs `fn` inside the task span's context. */
  within<T>(traceparent: string, tracestate: string | undefined, fn: () => T): T;
  /** Exports what the tasks' spans left buffered, for at most `ms`. */
  flush(ms: number): Promise<void>;
}

export async function registerChildTracing(config: TracingConfig): Promise<ChildTracing> {
  const provider = await providerOf(config);
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  trace.setGlobalTracerProvider(provider);
  return {
    within(traceparent, tracestate, fn) {
      const carrier: Record<string, string> = { traceparent };
      if (tracestate !== undefined) carrier.tracestate = tracestate;
      return context.with(propagation.extract(ROOT_CONTEXT, carrier), fn);
    },
    async flush(ms) {
      await Promise.race([provider.forceFlush(), new Promise((resolve) => setTimeout(resolve, ms).unref())]);
    },
  };
}
