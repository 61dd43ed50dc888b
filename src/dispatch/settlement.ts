// From the end of a run to the settled delivery (docs/architecture.md, stages 8 to 11):
// carry out the outcome plan, the reply and the dead-letter or retry copy confirmed by
// the broker, and only then the ack; or send a message that may not run yet to wait in a
// delay queue; or give it back. It also keeps the count of what is in flight and the
// bytes held, since a delivery leaves both only here. The dispatcher (dispatcher.ts)
// takes deliveries in and starts their runs; everything after the run is this module's.
//
// Every delivery is settled exactly once: whatever fails in settling it ends in an ack
// after a dead letter, or in a requeue.
import type { Logger } from 'pino';
import type { AmqpConsumer } from '../amqp/consumer.ts';
import { delayQueueName, delayStep } from '../amqp/delay.ts';
import type { AmqpPublisher } from '../amqp/publisher.ts';
import { PublishRefusedError, UnroutableError } from '../errors.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { Pool } from '../pool/pool.ts';
import { HeldBytes } from './held-bytes.ts';
import {
  cleanedCopy,
  delayedCopy,
  type Ending,
  errorOf,
  type Outcome,
  type OutcomePlan,
  type Publication,
  planOutcome,
  refusedReply,
} from './outcome.ts';
import type { Redeliveries } from './redeliveries.ts';
import { type RetryPolicy, retryRoute } from './retry-route.ts';
import { SettleFailures } from './settle-failures.ts';
import { isRenewed, logFields, type Work } from './work.ts';

/** How a publish ended: confirmed, refused for good (see PublishRefusedError), or failed for now. */
type PublishResult = 'ok' | 'refused' | 'failed';
/** What a publish came to, and why when it failed. */
type Published = { readonly status: PublishResult; readonly reason: string };
/** A confirmed publish: one shared answer (nobody changes it), not an object per task. */
const PUBLISHED: Published = Object.freeze({ status: 'ok', reason: '' });

export interface SettlementOptions {
  pool: Pick<Pool, 'limits'>;
  consumer: Pick<AmqpConsumer, 'ack' | 'requeue'>;
  publisher: Pick<AmqpPublisher, 'publish'>;
  metrics: Metrics;
  logger: Logger;
  queue: string;
  deadLetterQueue: string;
  retryPolicy: RetryPolicy;
  /** What keeps a redelivery of a message that runs or ran here from running again. */
  redeliveries: Redeliveries;
  /** Makes sure the delay queue of this TTL exists before a copy is sent to it (declared on first use). */
  declareDelayQueue?: ((stepMs: number) => Promise<void>) | undefined;
  /** The bytes of message bodies the master may hold in flight before consuming pauses (default: no limit). */
  heldBytesBudget?: number | undefined;
  /** Held bytes passed the budget (true), or came back under half of it (false). */
  onPressure?: ((over: boolean) => void) | undefined;
}

/** Whether giving the message back counts towards a quorum queue's delivery limit (basic.reject). */
function countsAgainst(outcome: Outcome | undefined): boolean {
  return outcome === 'failed' || outcome === 'timeout' || outcome === 'crashed';
}

export class Settlement {
  readonly #opts: SettlementOptions;
  readonly #log: Logger;
  /** Deliveries received and not yet settled. */
  #inFlight = 0;
  readonly #heldBytes: HeldBytes;
  #drained: (() => void) | undefined;
  #draining = false;
  /** When a message whose settling failed is requeued (settle-failures.ts). */
  readonly #settleFailures: SettleFailures;

  constructor(opts: SettlementOptions) {
    this.#opts = opts;
    this.#log = opts.logger;
    this.#settleFailures = new SettleFailures(this.#log);
    this.#heldBytes = new HeldBytes({
      budget: opts.heldBytesBudget,
      ...(opts.onPressure === undefined ? {} : { onPressure: opts.onPressure }),
      logger: this.#log,
    });
  }

  /** Nothing in flight: after a burst, the held bytes (HeldBytes) ask for a collection a second later. */
  readonly #idle = (): boolean => this.#inFlight === 0;

  /** Messages received and not yet settled. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** The bytes of the bodies of the messages in flight. */
  get heldBytes(): number {
    return this.#heldBytes.held;
  }

  /** A moving average of body sizes (undefined before the first), for the prefetch's memory bound. */
  get averageBodyBytes(): number | undefined {
    return this.#heldBytes.averageBody;
  }

  /** Whether the drain has begun: deliveries then go straight back to the queue. */
  get draining(): boolean {
    return this.#draining;
  }

  /** A delivery is in flight from now until it is settled here. */
  begin(work: Work): void {
    this.#inFlight++;
    this.#heldBytes.take(work.delivery.message.content.length);
  }

  /** Resolves when all in flight are settled; what is held after failing to settle goes back now. */
  drain(): Promise<void> {
    this.#draining = true;
    this.#heldBytes.close();
    this.#settleFailures.releaseAll();
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const previous = this.#drained;
      this.#drained = () => {
        previous?.();
        resolve();
      };
    });
  }

  /** The run is over: carry out the plan; synchronously when there is nothing to publish. */
  finish(work: Work, ending: Ending): void {
    if (work.finished) return;
    work.finished = true;
    this.#opts.redeliveries.unorphan(work);
    try {
      const { message } = work.delivery;
      const retry = retryRoute(
        work.attempt,
        this.#opts.pool.limits[work.func],
        this.#opts.retryPolicy,
        Date.now(),
      );
      work.retry = retry;
      const plan = planOutcome(message, ending, {
        deadLetterQueue: this.#opts.deadLetterQueue,
        attempt: work.attempt,
        retryQueue: retry?.queue,
        ...(retry?.until === undefined ? {} : { retryDelayUntil: retry.until }),
        ...(work.span === undefined ? {} : { traceparent: work.span.traceparent }),
      });
      if (work.span !== undefined) work.ended = { outcome: plan.outcome, error: errorOf(ending)?.message };
      if (plan.outcome === undefined && ending.outcome === 'returned' && ending.delayMs !== undefined) {
        // Held back by its function's limit too long to stay unacked: back through a delay queue.
        this.#log.info(
          { ...logFields(work), reason: ending.reason },
          'message sent to wait in a delay queue',
        );
        this.delay(work, Date.now() + ending.delayMs);
        return;
      }
      if (plan.outcome === undefined) {
        // Given back unfinished (a drain, a shrinking window): not the message's fault.
        this.#requeue(work, false);
        if (this.#log.isLevelEnabled('info')) {
          const reason = ending.outcome === 'returned' ? ending.reason : undefined;
          this.#log.info({ ...logFields(work), reason }, 'message given back to the queue');
        }
        this.#settled(work);
        return;
      }
      if (plan.reply === undefined && plan.deadLetter === undefined) {
        this.#ack(work, plan, ending);
        this.#settled(work);
        return;
      }
      // It settles the work itself: a give-back after a failed copy may be held a while.
      this.#publishThenAck(work, plan, ending).catch((err) => this.#failed(work, ending, err));
    } catch (err) {
      this.#failed(work, ending, err);
    }
  }

  /**
   * A message that may not run yet goes to wait in a delay queue (amqp/delay.ts): its
   * copy is confirmed there before it is acked here, and it is never held meanwhile.
   */
  delay(work: Work, until: number): void {
    work.finished = true;
    const step = delayStep(until - Date.now());
    const copy = delayedCopy(work.delivery.message, delayQueueName(this.#opts.queue, step), until);
    void this.#declareStep(step)
      .then(() => this.publish(copy))
      .then(({ status, reason }) => {
        if (status === 'refused') {
          // The broker can never take this copy (its headers, its size): it cannot wait,
          // so it ends now, dead-lettered (as a cleaned copy if need be) with the reason.
          work.finished = false;
          this.finish(work, { outcome: 'rejected', reason: `it cannot wait in a delay queue: ${reason}` });
          return;
        }
        if (status !== 'ok') {
          this.#log.error(
            logFields(work),
            'the delayed copy was not confirmed; message given back to the queue',
          );
          this.#requeueAfterFailure(work, false);
          return;
        }
        work.answered = true;
        if (!this.#opts.consumer.ack(work.delivery))
          this.#opts.redeliveries.finishedUnacked(work.delivery.message);
        this.#opts.metrics.delayed.inc({ func: work.func });
        if (this.#log.isLevelEnabled('debug'))
          this.#log.debug({ ...logFields(work), runsInMs: until - Date.now(), stepMs: step }, 'task delayed');
        this.#settled(work);
      });
  }

  /**
   * Publishes a copy (a reply, a dead letter, a retry or delayed copy, a renewal); nothing to publish
   * is a success. One `.then`, no async frame: it runs once per reply, an allocation per task.
   */
  publish(publication: Publication | undefined): Promise<Published> {
    if (publication === undefined) return Promise.resolve(PUBLISHED);
    let confirmed: Promise<void>;
    try {
      const { exchange, routingKey, content, options } = publication;
      confirmed = this.#opts.publisher.publish(exchange, routingKey, content, options);
    } catch (err) {
      // Never a throw from here, as from the async function this was: a failed publish.
      confirmed = Promise.reject(err);
    }
    return confirmed.then(
      () => PUBLISHED,
      (err: unknown) => {
        const refused = err instanceof PublishRefusedError;
        this.#opts.metrics.publishFailures.inc({
          reason: refused ? 'refused' : err instanceof UnroutableError ? 'unroutable' : 'unconfirmed',
        });
        this.#log.error({ err }, 'publish failed');
        return { status: refused ? 'refused' : 'failed', reason: (err as Error).message };
      },
    );
  }

  /** The delay queue exists (declared on first use; a failed declaration shows as an unroutable copy). */
  async #declareStep(stepMs: number): Promise<void> {
    await this.#opts.declareDelayQueue?.(stepMs).catch((err: unknown) => {
      this.#log.warn({ err, stepMs }, 'declaring a delay queue failed');
    });
  }

  async #publishThenAck(work: Work, plan: OutcomePlan, ending: Ending): Promise<void> {
    const step = work.retry?.step;
    if (plan.retry && step !== undefined) await this.#declareStep(step);
    const { reply, deadLetter: copy } = plan;
    const replying = 'the reply was refused; replying with the error';
    const copying = 'the dead-letter copy cannot be published as it is: publishing a cleaned copy';
    // Both at once when there are both; one alone (a reply, the usual case) is awaited alone.
    let replied: PublishResult = 'ok';
    let copied: PublishResult = 'ok';
    if (copy === undefined) replied = await this.#publishOrReplace(work, reply, refusedReply, replying);
    else if (reply === undefined) copied = await this.#publishOrReplace(work, copy, cleanedCopy, copying);
    else
      [replied, copied] = await Promise.all([
        this.#publishOrReplace(work, reply, refusedReply, replying),
        this.#publishOrReplace(work, copy, cleanedCopy, copying),
      ]);
    if (plan.reply !== undefined && replied !== 'ok') {
      this.#log.error(
        { ...logFields(work), replyTo: plan.reply.routingKey },
        'the reply could not be published',
      );
    }
    if (plan.deadLetter !== undefined) {
      if (copied !== 'ok') {
        // Not confirmed, so not acked: the message goes back rather than being lost.
        // Counted towards a quorum queue's delivery limit when the run was at fault.
        this.#log.error(
          logFields(work),
          'the dead-letter or retry copy was not confirmed; message given back to the queue',
        );
        this.#requeueAfterFailure(work, countsAgainst(plan.outcome));
        return;
      }
      if (!plan.retry) this.#opts.metrics.deadLettered.inc({ reason: plan.outcome as Outcome });
    }
    this.#ack(work, plan, ending);
    this.#settled(work);
  }

  /**
   * Publishes `publication`; one the broker can never take is replaced by what
   * `replacement` makes of it (a cleaned dead-letter copy, a short error reply), so that
   * the message still ends. Nothing to publish is a success.
   */
  #publishOrReplace(
    work: Work,
    publication: Publication | undefined,
    replacement: (refused: Publication, reason: string) => Publication,
    saying: string,
  ): Promise<PublishResult> {
    return this.publish(publication).then((result) => {
      if (result.status !== 'refused' || publication === undefined) return result.status;
      this.#log.error({ ...logFields(work), reason: result.reason }, saying);
      return this.publish(replacement(publication, result.reason)).then((again) => again.status);
    });
  }

  /** Acks (the latest delivery of the message), counts and logs the outcome. */
  #ack(work: Work, plan: OutcomePlan, ending: Ending): void {
    const outcome = plan.outcome as Outcome;
    // The delivery may have been replaced by a redelivery that arrived meanwhile: settle that one.
    work.answered = true;
    const renewed = isRenewed(work);
    this.#opts.redeliveries.settleTokens(work);
    // Acked already when renewed: its copy is acked when it comes.
    if (!renewed && !this.#opts.consumer.ack(work.delivery))
      // Its session has ended: the broker gives it again, and that must be acked unrun.
      this.#opts.redeliveries.finishedUnacked(work.delivery.message);
    const durationMs = 'durationMs' in ending ? ending.durationMs : 0;
    this.#opts.metrics.tasks.record(work.func, outcome, durationMs / 1000);
    if (outcome === 'succeeded') {
      if (this.#log.isLevelEnabled('info'))
        this.#log.info(
          { ...logFields(work), outcome, durationMs: Math.round(durationMs * 1000) / 1000 },
          'task succeeded',
        );
      return;
    }
    if (!this.#log.isLevelEnabled('warn')) return;
    const fields = { ...logFields(work), outcome, durationMs: Math.round(durationMs * 1000) / 1000 };
    const error = errorOf(ending)?.message;
    if (plan.retry) {
      const retryInMs = work.retry?.delayMs;
      this.#log.warn({ ...fields, error, retryInMs }, `task ${outcome}; retrying`);
    } else this.#log.warn({ ...fields, error }, `task ${outcome}`);
  }

  /**
   * Settling failed (a bug of ours, or a value nothing expected): the delivery must still
   * end, in a requeue, counted towards a quorum queue's delivery limit so that a message
   * that always fails here ends in the broker's dead-letter queue rather than loop.
   */
  #failed(work: Work, ending: Ending, err: unknown): void {
    this.#log.error({ err, ...logFields(work) }, 'settling a delivery failed; giving it back');
    // Never a second answer for one delivery: the broker closes the channel on that.
    if (work.answered) this.#settled(work);
    else this.#requeueAfterFailure(work, ending.outcome !== 'returned');
  }

  /**
   * Requeues a message whose settling failed, and ends it here: at once, or after a hold
   * when the same message keeps failing (settle-failures.ts).
   */
  #requeueAfterFailure(work: Work, counted: boolean): void {
    this.#settleFailures.failed(work, this.#draining, () => {
      try {
        if (!work.answered) this.#requeue(work, counted);
      } catch (err) {
        this.#log.error(
          { err },
          'giving a delivery back failed; the broker redelivers it when its channel ends',
        );
      }
      this.#settled(work);
    });
  }

  #requeue(work: Work, counted: boolean): void {
    work.answered = true;
    const renewal = work.renewal;
    if (renewal?.acked === true && work.delivery === renewal.adopted) {
      // Acked already; its renewal copy is in the queue and runs as the message given
      // back (with a fresh count: a counted give-back is not counted here).
      this.#opts.redeliveries.forgetCopy(renewal.token);
      return;
    }
    this.#opts.redeliveries.settleTokens(work);
    this.#opts.consumer.requeue(work.delivery, counted);
  }

  /** Done with this delivery, however it ended. */
  #settled(work: Work): void {
    const span = work.span;
    if (span !== undefined) {
      span.event('settled');
      span.end(work.ended?.outcome, work.ended?.error);
    }
    this.#opts.redeliveries.untrack(work);
    this.#inFlight--;
    this.#heldBytes.release(work.delivery.message.content.length, this.#idle);
    if (this.#inFlight === 0 && this.#drained !== undefined) {
      const drained = this.#drained;
      this.#drained = undefined;
      drained();
    }
  }
}
