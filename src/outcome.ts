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
  /** Published (and confirmed) before the original is settled. */
  deadLetter: Publication | undefined;
  reply: Publication | undefined;
  settle: 'ack' | 'requeue';
}

export interface PlanContext {
  deadLetterQueue: string;
  /** 1 for the first run of this message. */
  attempt: number;
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

/** The original's properties, fit to be published again as a dead letter. */
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
  const options: Options.Publish = {
    persistent: true,
    headers: {
      ...headers,
      'x-error-kind': kind,
      'x-error-message':
        errorMessage.length > MAX_ERROR_MESSAGE
          ? `${errorMessage.slice(0, MAX_ERROR_MESSAGE)}…`
          : errorMessage,
      'x-attempts': attempt,
      'x-original-routing-key': message.fields.routingKey,
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
  const options: Options.Publish = { contentType: 'application/json' };
  if (message.properties.correlationId !== undefined)
    options.correlationId = message.properties.correlationId;
  return { exchange: '', routingKey: replyQueue, content: Buffer.from(body), options };
}

export function planOutcome(message: ConsumeMessage, ending: Ending, ctx: PlanContext): OutcomePlan {
  if (ending.outcome === 'returned') {
    return { outcome: undefined, deadLetter: undefined, reply: undefined, settle: 'requeue' };
  }
  if (ending.outcome === 'succeeded') {
    return {
      outcome: 'succeeded',
      deadLetter: undefined,
      reply: replyTo(message, `{"ok":true,"result":${ending.resultJson ?? 'null'}}`),
      settle: 'ack',
    };
  }
  const error = errorOf(ending) as { kind: Outcome; message: string };
  return {
    outcome: error.kind,
    deadLetter: {
      exchange: '',
      routingKey: ctx.deadLetterQueue,
      content: message.content,
      options: deadLetterOptions(message, error.kind, error.message, ctx.attempt),
    },
    reply: replyTo(message, JSON.stringify({ ok: false, error })),
    settle: 'ack',
  };
}
