// Outcome bookkeeping (README "The message"): from what became of a task to what happens to its
// message: the reply, the dead-letter copy, and how the original is settled. Pure, so
// that every row of the outcome table is a unit test.
import type { ConsumeMessage, Options } from 'amqplib';
import type { JobResult } from '../pool/pool.ts';

export type Outcome = 'succeeded' | 'failed' | 'timeout' | 'crashed' | 'rejected' | 'cancelled';
export const OUTCOMES: readonly Outcome[] = [
  'succeeded',
  'failed',
  'timeout',
  'crashed',
  'rejected',
  'cancelled',
];

/** What the dispatcher knows at the end: the pool's result, or the reason the body was rejected. */
export type Ending = JobResult | { outcome: 'rejected'; reason: string };

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
}

export interface PlanContext {
  deadLetterQueue: string;
  /** 1 for the first run of this message. */
  attempt: number;
  /** The TTL queue of the next retry, when this attempt may be retried. */
  retryQueue: string | undefined;
  /** When the retry goes through the delay queues: the time (ms since the epoch) it may run. */
  retryDelayUntil?: number;
  /** The time now (ms since the epoch), for `x-died-at`; Date.now() when not given. */
  now?: number;
  /** The task's span, when tracing is on: the reply and the copies carry it on. */
  traceparent?: string;
}

/** The header a dead letter carries: when it died (ms since the epoch). */
export const DIED_AT_HEADER = 'x-died-at';

const MAX_ERROR_MESSAGE = 1_000;

/** The error an ending carries: its kind (the outcome) and message; none for a success or a give-back. */
export function errorOf(ending: Ending): { kind: Outcome; message: string } | undefined {
  switch (ending.outcome) {
    case 'rejected':
      return { kind: 'rejected', message: ending.reason };
    case 'failed':
    case 'timeout':
    case 'crashed':
    case 'cancelled':
      return { kind: ending.outcome, message: ending.error.message };
    default:
      return undefined;
  }
}

/**
 * A header of the message's own, never one inherited. amqplib decodes a header table into
 * a plain object by assignment, so a header named `__proto__` whose value is a table
 * becomes the object's prototype, and its keys would read as headers of the message.
 */
export function ownHeader(headers: Record<string, unknown> | undefined, name: string): unknown {
  return headers !== undefined && Object.hasOwn(headers, name) ? headers[name] : undefined;
}

/**
 * The message's headers as a plain object of its own keys, for a copy: a `__proto__`
 * header that amqplib turned into the prototype (see ownHeader) is put back as a header
 * like any other, so the copy carries what the producer sent.
 */
export function copiedHeaders(headers: Record<string, unknown> | undefined): Record<string, unknown> {
  const copy: Record<string, unknown> = {};
  if (headers === undefined) return copy;
  for (const name of Object.keys(headers))
    Object.defineProperty(copy, name, {
      value: headers[name],
      enumerable: true,
      writable: true,
      configurable: true,
    });
  const proto = Object.getPrototypeOf(headers) as unknown;
  if (proto !== Object.prototype && proto !== null)
    Object.defineProperty(copy, '__proto__', {
      value: proto,
      enumerable: true,
      writable: true,
      configurable: true,
    });
  return copy;
}

/** The attempt a delivery is, from our own header (never x-death, which RabbitMQ 4 ignores from clients). */
export function attemptOf(message: ConsumeMessage): number {
  const previous = ownHeader(message.properties.headers, 'x-attempts');
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
  const originalKey = ownHeader(headers, 'x-original-routing-key');
  const options: Options.Publish = {
    persistent: true,
    // An unroutable copy (its queue deleted) is returned, and then it is a failed publish:
    // the original goes back instead of being acked with its copy nowhere.
    mandatory: true,
    headers: {
      ...copiedHeaders(headers),
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

function replyTo(message: ConsumeMessage, body: string, traceparent?: string): Publication | undefined {
  const replyQueue = message.properties.replyTo as string | undefined;
  if (replyQueue === undefined || replyQueue === '') return undefined;
  // As durable as the request: a caller that published persistently into a durable reply
  // queue gets a reply that survives a broker restart too.
  const options: Options.Publish = {
    contentType: 'application/json',
    persistent: message.properties.deliveryMode === 2,
  };
  if (traceparent !== undefined) options.headers = { traceparent };
  if (message.properties.correlationId !== undefined)
    options.correlationId = message.properties.correlationId;
  return { exchange: '', routingKey: replyQueue, content: Buffer.from(body), options };
}

export function planOutcome(message: ConsumeMessage, ending: Ending, ctx: PlanContext): OutcomePlan {
  if (ending.outcome === 'returned') {
    return { outcome: undefined, deadLetter: undefined, retry: false, reply: undefined };
  }
  if (ending.outcome === 'succeeded') {
    return {
      outcome: 'succeeded',
      deadLetter: undefined,
      retry: false,
      reply: replyTo(message, `{"ok":true,"result":${ending.resultJson ?? 'null'}}`, ctx.traceparent),
    };
  }
  const error = errorOf(ending) as { kind: Outcome; message: string };
  // A malformed message fails the same way every time, and a cancelled one was meant to
  // stop: neither is retried.
  const retryQueue = error.kind === 'rejected' || error.kind === 'cancelled' ? undefined : ctx.retryQueue;
  const options = deadLetterOptions(message, error.kind, error.message, ctx.attempt);
  const headers = options.headers as Record<string, unknown>;
  if (retryQueue !== undefined && ctx.retryDelayUntil !== undefined)
    headers[DELAY_UNTIL_HEADER] = ctx.retryDelayUntil;
  // When it died, for `dead list --older-than` (the timestamp property is when it was published).
  if (retryQueue === undefined) headers[DIED_AT_HEADER] = ctx.now ?? Date.now();
  // The trace goes on from the task's span: a retry's span is its child.
  if (ctx.traceparent !== undefined) headers.traceparent = ctx.traceparent;
  return {
    outcome: error.kind,
    deadLetter: {
      exchange: '',
      routingKey: retryQueue ?? ctx.deadLetterQueue,
      content: message.content,
      options,
    },
    retry: retryQueue !== undefined,
    // The caller hears once, at the end: not while retries remain.
    reply:
      retryQueue === undefined
        ? replyTo(message, JSON.stringify({ ok: false, error }), ctx.traceparent)
        : undefined,
  };
}

/** The headers the service itself sets on a copy: what a cleaned copy keeps. */
const OWN_HEADERS = [
  'x-error-kind',
  'x-error-message',
  'x-attempts',
  'x-original-routing-key',
  'x-died-at',
  'traceparent',
  'x-delay-until',
] as const;

/**
 * A dead-letter or retry copy that can be published when the original's headers cannot
 * be copied (a table over the encoder's 64 KB, a nested table that reads as amqplib's
 * typed-value escape): the producer's headers are dropped, their names counted, and
 * `x-error-message` says so. The body is the original's, which the broker already took.
 */
export function cleanedCopy(copy: Publication, reason: string): Publication {
  const headers = copy.options.headers ?? {};
  const own = new Set<string>(OWN_HEADERS);
  const dropped = Object.keys(headers).filter((name) => !own.has(name)).length;
  const message = String(headers['x-error-message'] ?? '');
  const originalKey = headers['x-original-routing-key'];
  const note = `; the original's headers could not be copied (${dropped} dropped: ${reason})`;
  const options: Options.Publish = {
    persistent: true,
    mandatory: true,
    headers: {
      'x-error-kind': headers['x-error-kind'],
      'x-error-message': truncate(message, MAX_ERROR_MESSAGE) + truncate(note, MAX_ERROR_MESSAGE),
      'x-attempts': headers['x-attempts'],
      // A routing key is at most 255 bytes: a longer one came from a forged header.
      'x-original-routing-key': typeof originalKey === 'string' ? truncate(originalKey, 255) : '',
      'x-headers-dropped': dropped,
      ...(typeof headers['x-died-at'] === 'number' ? { 'x-died-at': headers['x-died-at'] } : {}),
      // A retry on its way through the delay queues must still wait its time.
      ...(typeof headers['x-delay-until'] === 'number' ? { 'x-delay-until': headers['x-delay-until'] } : {}),
      ...(typeof headers.traceparent === 'string' && headers.traceparent.length <= 128
        ? { traceparent: headers.traceparent }
        : {}),
    },
  };
  for (const key of [
    'messageId',
    'correlationId',
    'contentType',
    'contentEncoding',
    'timestamp',
    'type',
  ] as const) {
    const value = copy.options[key];
    if (typeof value === 'string' || typeof value === 'number')
      (options as Record<string, unknown>)[key] = value;
  }
  return { ...copy, options };
}

/**
 * The reply to send when the real one can never be published (over the broker's
 * max_message_size, say): a short error, so that the caller is not left waiting.
 */
export function refusedReply(reply: Publication, reason: string): Publication {
  const error = {
    kind: 'failed',
    message: truncate(`the reply could not be published: ${reason}`, MAX_ERROR_MESSAGE),
  };
  const options: Options.Publish = {
    contentType: 'application/json',
    persistent: reply.options.persistent === true,
  };
  if (reply.options.correlationId !== undefined) options.correlationId = reply.options.correlationId;
  return { ...reply, content: Buffer.from(JSON.stringify({ ok: false, error })), options };
}

function truncate(text: string, max: number): string {
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/**
 * The header a delayed message carries on its way through the delay queues: the time (ms
 * since the epoch) before which it must not run (see amqp/delay.ts).
 */
export const DELAY_UNTIL_HEADER = 'x-delay-until';

/**
 * A copy of a message, as it came, routed by queue name back into the service's queues:
 * the same body, properties and headers (a fresh delivery count on a quorum queue) plus
 * `extra`, its `x-original-routing-key` kept, or set, as for a retry copy. Never its
 * user-id (the broker refuses another connection's); without `expiration` when `dropTtl`.
 */
function sameMessage(
  message: ConsumeMessage,
  queue: string,
  extra: Record<string, unknown>,
  dropTtl: boolean,
): Publication {
  const { userId: _userId, headers, deliveryMode, expiration, ...kept } = message.properties;
  const options: Options.Publish = {
    persistent: deliveryMode === 2,
    mandatory: true,
    headers: {
      ...copiedHeaders(headers),
      'x-original-routing-key': ownHeader(headers, 'x-original-routing-key') ?? message.fields.routingKey,
      ...extra,
    },
  };
  if (!dropTtl && expiration !== undefined) options.expiration = expiration;
  for (const [key, value] of Object.entries(kept)) {
    if (value !== undefined) (options as Record<string, unknown>)[key] = value;
  }
  return { exchange: '', routingKey: queue, content: message.content, options };
}

/**
 * A copy of a message on its way to a delay queue, stamped `x-delay-until`, without
 * `expiration` (a per-message TTL would cut its wait short).
 */
export function delayedCopy(message: ConsumeMessage, delayQueue: string, until: number): Publication {
  return sameMessage(message, delayQueue, { [DELAY_UNTIL_HEADER]: until }, true);
}

/** The header that names a copy made of an adopted redelivery (see Dispatcher's #renew). */
export const ADOPTED_COPY_HEADER = 'x-adopted-copy';

/**
 * A copy of a message, as it came, to go straight back into its work queue, with a token
 * that lets the service that made it recognise it (see sameMessage).
 */
export function adoptedCopy(message: ConsumeMessage, queue: string, token: string): Publication {
  return sameMessage(message, queue, { [ADOPTED_COPY_HEADER]: token }, false);
}
