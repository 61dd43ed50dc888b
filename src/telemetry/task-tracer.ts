// What the dispatcher asks of tracing (README "Tracing"): one span per task. This is the
// whole interface the per-task path sees; without OTEL_* there is no tracer at all, and
// the dispatcher asks nothing (tracing.ts implements it with the OpenTelemetry SDK).

/** The outcome names a span ends with (dispatch/outcome.ts). */
export type SpanOutcome = 'succeeded' | 'failed' | 'timeout' | 'crashed' | 'rejected' | 'cancelled';

export interface TaskSpan {
  /** The span's own W3C traceparent: what the task sees, and what its replies and copies carry. */
  readonly traceparent: string;
  readonly tracestate: string | undefined;
  readonly traceId: string;
  readonly spanId: string;
  /** A moment of its life: `queued` (in the master), `started` (in a worker), `settled`. */
  event(name: string): void;
  /** Ends it: status ERROR, with the error, for every outcome but succeeded and cancelled. */
  end(outcome: SpanOutcome | undefined, error?: string): void;
}

export interface TaskMessage {
  func: string;
  headers: Record<string, unknown> | undefined;
  queue: string;
  routingKey: string;
  exchange: string;
  messageId: string | undefined;
  attempt: number;
  bodyBytes: number;
}

export interface TaskTracer {
  /** A span for one task, child of the message's traceparent (a new trace without one). */
  start(message: TaskMessage): TaskSpan;
  /** Exports what is buffered and stops. */
  shutdown(): Promise<void>;
}
