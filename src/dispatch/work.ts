// The dispatcher's record of one message, from delivery to settlement (docs/architecture.md,
// stage 4), and the keys a redelivery of it is recognised by. Shared by the dispatcher,
// which runs and settles it, and the redelivery memory (redeliveries.ts), which keeps a
// message that comes back meanwhile from running twice.
import type { ConsumeMessage } from 'amqplib';
import type { AckMemo, Delivery } from '../amqp/delivery.ts';
import type { SpanOutcome, TaskSpan } from '../telemetry/task-tracer.ts';
import { crashKey } from './crash-journal.ts';
import { attemptOf } from './outcome.ts';
import type { RetryRoute } from './retry-route.ts';
import type { TaskCall } from './task-message.ts';

/**
 * What identifies one delivery of one message for the dedupe memory: the message id
 * alone is not enough, since a retry copy keeps it (with a higher x-attempts), and a
 * replayed dead letter or another producer's reuse would then be acked unrun. The body
 * length is a cheap guard against a reused id; the memory also expires.
 */
export function dedupeKey(messageId: string, attempt: number, bodyLength: number): string {
  return `${messageId}\u0000${attempt}\u0000${bodyLength}`;
}

/** A message being worked on; its delivery is replaced when the broker redelivers it meanwhile. */
export interface Work {
  delivery: Delivery;
  messageId: string | undefined;
  /** Its dedupe key (see dedupeKey), when it has a message id. */
  key: string | undefined;
  /** True when this run is the one recorded under its key (Redeliveries.track). */
  tracked: boolean;
  func: string;
  attempt: number;
  /** An ack or a requeue has been given for it: it must never get another. */
  answered: boolean;
  /** Its ending has been taken: a second one (a late pool result) is ignored. */
  finished: boolean;
  /** What to run, when the body is a valid task. */
  call: TaskCall | undefined;
  /** Its body digest while it is an orphan: running, without a message id, its session dead. */
  orphanKey?: string;
  /** The renewal under way (Redeliveries, #renew): one at a time. */
  renewal?: Renewal;
  /** Every renewal token issued for it: settled with it, so a late copy is acked unrun. */
  tokens?: string[];
  /** Where its retry goes, once its ending is known (the delay queue, if any, is declared first). */
  retry?: RetryRoute;
  /** Its span, when tracing is on; ended when it is settled, with what `ended` says. */
  span?: TaskSpan;
  ended?: { outcome: SpanOutcome | undefined; error: string | undefined };
}

export interface Renewal {
  token: string;
  /** The adopted redelivery being replaced by the copy. */
  adopted: Delivery;
  /** The copy was confirmed and `adopted` acked: the copy is now the message. */
  acked: boolean;
}

/**
 * Without a message id, a message's identity is its body: the key a redelivery of it is
 * recognised by (a digest, never the body itself). Two messages with the same body are
 * two entries (the memories below count).
 */
export function bodyKey(body: Buffer): string {
  return `body\u0000${crashKey(undefined, body)}`;
}

/**
 * What the consumer keeps of a delivery acked until its ack is proven (its ackMemo): the
 * key it is remembered under if that ack turns out uncertain (finishedKey), or, without a
 * message id, its body, digested only then: a digest per task would cost the master more
 * than the memo saves.
 */
export function finishedMemo(message: ConsumeMessage): AckMemo {
  const id = message.properties.messageId;
  return typeof id === 'string' ? dedupeKey(id, attemptOf(message), message.content.length) : message.content;
}

/** The key a finished delivery is remembered under when its ack is uncertain. */
export function finishedKey(memo: AckMemo): string {
  return typeof memo === 'string' ? memo : bodyKey(memo);
}

/** Its adopted redelivery was renewed (the copy confirmed, the redelivery acked): the copy is now the message. */
export function isRenewed(work: Work): boolean {
  return work.renewal?.acked === true && work.delivery === work.renewal.adopted;
}

/** The fields every log line about a message carries (never its body). */
export function logFields(work: Work) {
  const { fields } = work.delivery.message;
  const base = {
    func: work.func,
    messageId: work.messageId,
    deliveryTag: fields.deliveryTag,
    redelivered: fields.redelivered,
    attempt: work.attempt,
  };
  const span = work.span;
  return span === undefined ? base : { ...base, trace_id: span.traceId, span_id: span.spanId };
}
