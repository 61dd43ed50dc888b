// Outcome bookkeeping (SPEC §2): from what became of a task to what happens to its
// message: the reply, the dead-letter copy, and how the original is settled. Pure, so
// that every row of the outcome table is a unit test.
import type { ConsumeMessage, Options } from 'amqplib';
import type { TaskResult } from './pool.ts';

export type Outcome = 'succeeded' | 'failed' | 'timeout' | 'crashed' | 'rejected';
export const OUTCOMES: readonly Outcome[] = ['succeeded', 'failed', 'timeout', 'crashed', 'rejected'];

/** What the dispatcher knows at the end: the pool's result, or the reason the body was rejected. */
export type Ending = TaskResult | { outcome: 'rejected'; reason: string };

export interface Publication {
  exchange: string;
  routingKey: string;
  content: Buffer;
  options: Options.Publish;
}

export interface OutcomePlan {
  /** Undefined when the message was given back unfinished: no outcome is counted. */
  outcome: Outcome | undefined;
  /**
   * Published (and confirmed) before the original is settled: the dead letter, or the
   * retry copy (see `retry`) on its way back through a TTL queue.
   */
  deadLetter: Publication | undefined;
  /** True when `deadLetter` is a retry, not the end of the message. */
  retry: boolean;
  reply: Publication | undefined;
  settle: 'ack' | 'requeue';
}

export interface PlanContext {
  deadLetterQueue: string;
  /** 1 for the first run of this message. */
  attempt: number;
  /** The TTL queue of the next retry, when this attempt may be retried. */
  retryQueue: string | undefined;
}

const MAX_ERROR_MESSAGE = 1_000;

function errorOf(ending: Ending): { kind: Outcome; message: string } | undefined {
  switch (ending.outcome) {
    case 'rejected':
      return { kind: 'rejected', message: ending.reason };
    case 'failed':
    case 'timeout':
    case 'crashed':
      return { kind: ending.outcome, message: ending.error.message };
    default:
      return undefined;
  }
}

/** The attempt a delivery is, from our own header (never x-death, which RabbitMQ 4 ignores from clients). */
export function attemptOf(message: ConsumeMessage): number {
  const previous = message.properties.headers?.['x-attempts'];
  return typeof previous === 'number' && Number.isSafeInteger(previous) && previous >= 0 ? previous + 1 : 1;
}

/** The original's properties, fit to be published again as a dead letter or a retry. */
function deadLetterOptions(
  message: ConsumeMessage,
  kind: Outcome,
  errorMessage: string,
  attempt: number,
): Options.Publish {
  // Everything but `expiration` (a dead letter must not expire in the dead-letter queue)
  // and `userId` (the broker refuses a user-id that is not the publishing connection's).
  const {
    expiration: _expiration,
    userId: _userId,
    headers,
    deliveryMode: _mode,
    ...kept
  } = message.properties;
  // The key the producer used, kept across retries: a retry copy is routed by queue name.
  const originalKey = headers?.['x-original-routing-key'];
  const options: Options.Publish = {
    persistent: true,
    // An unroutable copy (its queue deleted) is returned, and then it is a failed publish:
    // the original goes back instead of being acked with its copy nowhere.
    mandatory: true,
    headers: {
      ...headers,
      'x-error-kind': kind,
      'x-error-message':
        typeof errorMessage !== 'string'
          ? String(errorMessage)
          : errorMessage.length > MAX_ERROR_MESSAGE
            ? `${errorMessage.slice(0, MAX_ERROR_MESSAGE)}…`
            : errorMessage,
      'x-attempts': attempt,
      'x-original-routing-key': typeof originalKey === 'string' ? originalKey : message.fields.routingKey,
    },
  };
  for (const [key, value] of Object.entries(kept)) {
    if (value !== undefined) (options as Record<string, unknown>)[key] = value;
  }
  return options;
}

function replyTo(message: ConsumeMessage, body: string): Publication | undefined {
  const replyQueue = message.properties.replyTo as string | undefined;
  if (replyQueue === undefined || replyQueue === '') return undefined;
  // As durable as the request: a caller that published persistently into a durable reply
  // queue gets a reply that survives a broker restart too.
  const options: Options.Publish = {
    contentType: 'application/json',
    persistent: message.properties.deliveryMode === 2,
  };
  if (message.properties.correlationId !== undefined)
    options.correlationId = message.properties.correlationId;
  return { exchange: '', routingKey: replyQueue, content: Buffer.from(body), options };
}

export function planOutcome(message: ConsumeMessage, ending: Ending, ctx: PlanContext): OutcomePlan {
  if (ending.outcome === 'returned') {
    return { outcome: undefined, deadLetter: undefined, retry: false, reply: undefined, settle: 'requeue' };
  }
  if (ending.outcome === 'succeeded') {
    return {
      outcome: 'succeeded',
      deadLetter: undefined,
      retry: false,
      reply: replyTo(message, `{"ok":true,"result":${ending.resultJson ?? 'null'}}`),
      settle: 'ack',
    };
  }
  const error = errorOf(ending) as { kind: Outcome; message: string };
  // A malformed message fails the same way every time: it is never retried.
  const retryQueue = error.kind === 'rejected' ? undefined : ctx.retryQueue;
  return {
    outcome: error.kind,
    deadLetter: {
      exchange: '',
      routingKey: retryQueue ?? ctx.deadLetterQueue,
      content: message.content,
      options: deadLetterOptions(message, error.kind, error.message, ctx.attempt),
    },
    retry: retryQueue !== undefined,
    // The caller hears once, at the end: not while retries remain.
    reply: retryQueue === undefined ? replyTo(message, JSON.stringify({ ok: false, error })) : undefined,
    settle: 'ack',
  };
}
