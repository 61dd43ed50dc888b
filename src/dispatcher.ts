// From delivery to settlement: validate the body, run it in the pool, then carry out the
// outcome plan — reply, dead-letter or retry copy confirmed by the broker, and only then
// the ack. One bad message never stops or slows the others: each delivery is settled on
// its own. Across a reconnect, a message that comes back while it still runs, or after
// it finished but before its ack reached the broker, is not run a second time; what its
// dead channel delivered and had not started is dropped (the broker has it again).
//
// Every delivery is settled exactly once: whatever a task throws and whatever fails in
// settling it ends in an ack after a dead letter, or in a requeue.
//
// Speed: this is the master's per-task path. A task with nothing to publish (no reply_to,
// succeeded) is settled synchronously when the pool's promise resolves: no async chain, no
// log fields built for a level that is off (see also task-metrics.ts).
import type { Logger } from 'pino';
import type { AmqpConsumer, Delivery } from './amqp-consumer.ts';
import { type AmqpPublisher, UnroutableError } from './amqp-publisher.ts';
import { type CrashJournal, crashKey } from './crash-journal.ts';
import { serializeError } from './errors.ts';
import { type Metrics, UNKNOWN_FUNC } from './metrics.ts';
import {
  attemptOf,
  type Ending,
  type Outcome,
  type OutcomePlan,
  type Publication,
  planOutcome,
} from './outcome.ts';
import type { WorkerPool } from './pool.ts';
import { RecentIds } from './recent-ids.ts';
import { parseTaskMessage, type TaskCall } from './task-message.ts';
import { retryQueueName } from './topology.ts';

export interface DispatcherOptions {
  pool: WorkerPool;
  consumer: Pick<AmqpConsumer, 'ack' | 'requeue' | 'isLive'>;
  publisher: Pick<AmqpPublisher, 'publish'>;
  metrics: Metrics;
  logger: Logger;
  queue: string;
  deadLetterQueue: string;
  maxMessageBytes: number;
  /** The delay of retry k at index k-1; empty when retries are off. */
  retryDelaysMs: readonly number[];
  /** How many finished-but-unacked deliveries to remember (default 10,000). */
  recentIdsCapacity?: number;
  /** How long to remember one (default 5 minutes; see dedupeKey). */
  recentIdsTtlMs?: number;
  /** Where deaths of the master while handling a message are written down (classic queues). */
  crashJournal?: CrashJournal;
}

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
interface Work {
  delivery: Delivery;
  messageId: string | undefined;
  /** Its dedupe key (see dedupeKey), when it has a message id. */
  key: string | undefined;
  /** True when this run is the one recorded under its key (see #running). */
  tracked: boolean;
  func: string;
  attempt: number;
  /** An ack or a requeue has been given for it: it must never get another. */
  answered: boolean;
  /** Its ending has been taken: a second one (a late pool result) is ignored. */
  finished: boolean;
  /** What to run, when the body is a valid task. */
  call: TaskCall | undefined;
}

/** Whether giving the message back counts towards a quorum queue's delivery limit (basic.reject). */
function countsAgainst(outcome: Outcome | undefined): boolean {
  return outcome === 'failed' || outcome === 'timeout' || outcome === 'crashed';
}

export class Dispatcher {
  readonly #opts: DispatcherOptions;
  readonly #log: Logger;
  /** Deliveries received and not yet settled. */
  #inFlight = 0;
  #drained: (() => void) | undefined;
  readonly #running = new Map<string, Work>();
  readonly #finishedUnacked: RecentIds;
  #draining = false;
  /** The delivery being handled right now, synchronously: the suspect if the master dies. */
  #onStack: Delivery | undefined;

  constructor(opts: DispatcherOptions) {
    this.#opts = opts;
    this.#log = opts.logger.child({ component: 'dispatcher' });
    this.#finishedUnacked = new RecentIds(
      opts.recentIdsCapacity ?? 10_000,
      opts.recentIdsTtlMs ?? 5 * 60_000,
    );
  }

  /** Messages received and not yet settled. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /**
   * Takes one delivery. Whatever goes wrong in handling it ends that delivery alone (dead-
   * lettered as crashed, or given back): a throw here would otherwise reach amqplib's
   * frame loop, or stop the master, and with it every other message in flight.
   */
  handle(delivery: Delivery): void {
    this.#onStack = delivery;
    let work: Work | undefined;
    try {
      work = this.#accept(delivery);
      if (work !== undefined) this.#start(work);
    } catch (err) {
      this.#refuse(delivery, work, err);
    } finally {
      this.#onStack = undefined;
    }
  }

  /** The Work for a delivery, or undefined when it is taken care of without a run. */
  #accept(delivery: Delivery): Work | undefined {
    const { consumer, pool } = this.#opts;
    if (this.#draining) {
      consumer.requeue(delivery);
      return undefined;
    }
    const { message } = delivery;
    const rawId = message.properties.messageId;
    const messageId = typeof rawId === 'string' ? rawId : undefined;
    const attempt = attemptOf(message);
    const key = messageId === undefined ? undefined : dedupeKey(messageId, attempt, message.content.length);
    if (key !== undefined && message.fields.redelivered && this.#settleDuplicate(delivery, key))
      return undefined;
    const tracked = key !== undefined && !this.#running.has(key);
    // Before anything else looks into the body: handling it is what killed the master.
    const deaths = message.fields.redelivered ? this.#deathsOf(messageId, message.content) : 0;
    const parsed =
      deaths === 0 ? parseTaskMessage(message.content, pool.funcs, this.#opts.maxMessageBytes) : undefined;
    const work: Work = {
      delivery,
      messageId,
      key,
      tracked,
      func: parsed === undefined ? UNKNOWN_FUNC : parsed.ok ? parsed.call.func : this.#labelOf(parsed.func),
      attempt,
      answered: false,
      finished: false,
      call: parsed?.ok ? parsed.call : undefined,
    };
    if (tracked) this.#running.set(key, work);
    this.#inFlight++;
    if (parsed === undefined) {
      this.#log.error(
        { ...this.#fields(work), deaths },
        'the service stopped each time it handled this message: dead-lettering it as crashed',
      );
      this.#finish(work, {
        outcome: 'crashed',
        error: {
          name: 'CrashLoop',
          message: `the service stopped ${deaths} times while handling this message`,
          code: 'ERR_CRASH_LOOP',
        },
        durationMs: 0,
      });
      this.#opts.crashJournal?.forget(crashKey(messageId, message.content));
      return undefined;
    }
    if (!parsed.ok) {
      this.#finish(work, { outcome: 'rejected', reason: parsed.reason });
      return undefined;
    }
    return work;
  }

  #start(work: Work): void {
    const { consumer, pool } = this.#opts;
    const call = work.call as TaskCall;
    const { message } = work.delivery;
    const replyTo = message.properties.replyTo;
    pool
      .run({
        func: call.func,
        args: call.args,
        kwargs: call.kwargs,
        messageId: work.messageId,
        redelivered: message.fields.redelivered,
        attempt: work.attempt,
        wantResult: typeof replyTo === 'string' && replyTo !== '',
        // Asked before it starts: the latest delivery of the message (a redelivery may
        // have taken over) decides.
        abandoned: () => !consumer.isLive(work.delivery),
      })
      .then((ending) => this.#finish(work, ending));
  }

  /** How many times the master died handling this message, when that reaches the limit; else 0. */
  #deathsOf(messageId: string | undefined, body: Buffer): number {
    const journal = this.#opts.crashJournal;
    if (journal === undefined || journal.empty) return 0;
    const deaths = journal.deaths(crashKey(messageId, body));
    return deaths >= journal.limit ? deaths : 0;
  }

  /** Handling a delivery threw: end it alone, as crashed (dead-lettered), or give it back. */
  #refuse(delivery: Delivery, work: Work | undefined, err: unknown): void {
    const cause = serializeError(err);
    this.#log.error(
      { err: cause, deliveryTag: delivery.message.fields.deliveryTag },
      'handling a delivery failed',
    );
    if (work !== undefined) {
      this.#finish(work, {
        outcome: 'crashed',
        error: {
          name: 'DispatchError',
          message: `handling the message failed: ${cause.message}`,
          code: 'ERR_DISPATCH',
        },
        durationMs: 0,
      });
      return;
    }
    try {
      this.#opts.consumer.requeue(delivery, true);
    } catch {
      // Its channel is going: the broker has it back.
    }
  }

  /**
   * The last resort, when the master is about to die of an error nobody caught: if a
   * delivery was being handled, write it down (synchronously) so that the crash loop it
   * may cause is broken (see crash-journal.ts).
   */
  recordCrash(): void {
    const delivery = this.#onStack;
    const journal = this.#opts.crashJournal;
    if (delivery === undefined || journal === undefined) return;
    const id = delivery.message.properties.messageId;
    journal.suspect(crashKey(typeof id === 'string' ? id : undefined, delivery.message.content));
  }

  /** From now on deliveries go straight back to the queue; resolves when all in flight are settled. */
  drain(): Promise<void> {
    this.#draining = true;
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const previous = this.#drained;
      this.#drained = () => {
        previous?.();
        resolve();
      };
    });
  }

  /** A func name for metrics: only the module's own, so that label sets stay bounded. */
  #labelOf(func: string | undefined): string {
    return func !== undefined && this.#opts.pool.funcs.has(func) ? func : UNKNOWN_FUNC;
  }

  /** True when this redelivery is taken care of without running it again. */
  #settleDuplicate(delivery: Delivery, key: string): boolean {
    const { consumer } = this.#opts;
    const fields = {
      messageId: delivery.message.properties.messageId,
      deliveryTag: delivery.message.fields.deliveryTag,
    };
    // The running set first: a run in progress is the truth, a memory only a record.
    const running = this.#running.get(key);
    if (running !== undefined && !consumer.isLive(running.delivery)) {
      running.delivery = delivery;
      this.#log.info(fields, 'redelivery of a message still running: it will be settled when the run ends');
      return true;
    }
    if (running === undefined && this.#finishedUnacked.has(key)) {
      this.#finishedUnacked.delete(key);
      consumer.ack(delivery);
      this.#log.info(fields, 'redelivery of a message that already finished: acked, not run again');
      return true;
    }
    return false;
  }

  /** The run is over: carry out the plan; synchronously when there is nothing to publish. */
  #finish(work: Work, ending: Ending): void {
    if (work.finished) return;
    work.finished = true;
    try {
      const { message } = work.delivery;
      const retryDelayMs = this.#opts.retryDelaysMs[work.attempt - 1];
      const plan = planOutcome(message, ending, {
        deadLetterQueue: this.#opts.deadLetterQueue,
        attempt: work.attempt,
        retryQueue: retryDelayMs === undefined ? undefined : retryQueueName(this.#opts.queue, retryDelayMs),
      });
      if (plan.outcome === undefined) {
        // Given back unfinished (a drain, a shrinking window): not the message's fault.
        this.#requeue(work, false);
        if (this.#log.isLevelEnabled('info')) {
          const reason = ending.outcome === 'returned' ? ending.reason : undefined;
          this.#log.info({ ...this.#fields(work), reason }, 'message given back to the queue');
        }
        this.#settled(work);
        return;
      }
      if (plan.reply === undefined && plan.deadLetter === undefined) {
        this.#ack(work, plan, ending);
        this.#settled(work);
        return;
      }
      this.#publishThenAck(work, plan, ending).then(
        () => this.#settled(work),
        (err) => this.#failed(work, ending, err),
      );
    } catch (err) {
      this.#failed(work, ending, err);
    }
  }

  async #publishThenAck(work: Work, plan: OutcomePlan, ending: Ending): Promise<void> {
    const [replied, copied] = await Promise.all([this.#publish(plan.reply), this.#publish(plan.deadLetter)]);
    if (plan.reply !== undefined && !replied) {
      this.#log.error(
        { ...this.#fields(work), replyTo: plan.reply.routingKey },
        'the reply could not be published',
      );
    }
    if (plan.deadLetter !== undefined) {
      if (!copied) {
        // Not confirmed, so not acked: the message goes back rather than being lost.
        // Counted towards a quorum queue's delivery limit when the run was at fault.
        this.#requeue(work, countsAgainst(plan.outcome));
        this.#log.error(
          this.#fields(work),
          'the dead-letter or retry copy was not confirmed; message given back to the queue',
        );
        return;
      }
      if (!plan.retry) this.#opts.metrics.deadLettered.inc({ reason: plan.outcome as Outcome });
    }
    this.#ack(work, plan, ending);
  }

  /** Acks (the latest delivery of the message), counts and logs the outcome. */
  #ack(work: Work, plan: OutcomePlan, ending: Ending): void {
    const outcome = plan.outcome as Outcome;
    // The delivery may have been replaced by a redelivery that arrived meanwhile: settle that one.
    work.answered = true;
    if (!this.#opts.consumer.ack(work.delivery) && work.key !== undefined)
      this.#finishedUnacked.add(work.key);
    const durationMs = 'durationMs' in ending ? ending.durationMs : 0;
    this.#opts.metrics.tasks.record(work.func, outcome, durationMs / 1000);
    if (outcome === 'succeeded') {
      if (this.#log.isLevelEnabled('info'))
        this.#log.info(
          { ...this.#fields(work), outcome, durationMs: Math.round(durationMs * 1000) / 1000 },
          'task succeeded',
        );
      return;
    }
    if (!this.#log.isLevelEnabled('warn')) return;
    const fields = { ...this.#fields(work), outcome, durationMs: Math.round(durationMs * 1000) / 1000 };
    const error =
      ending.outcome === 'rejected' ? ending.reason : 'error' in ending ? ending.error.message : undefined;
    if (plan.retry) {
      const retryInMs = this.#opts.retryDelaysMs[work.attempt - 1];
      this.#log.warn({ ...fields, error, retryInMs }, `task ${outcome}; retrying`);
    } else this.#log.warn({ ...fields, error }, `task ${outcome}`);
  }

  #fields(work: Work) {
    const { fields } = work.delivery.message;
    return {
      func: work.func,
      messageId: work.messageId,
      deliveryTag: fields.deliveryTag,
      redelivered: fields.redelivered,
      attempt: work.attempt,
    };
  }

  /**
   * Settling failed (a bug of ours, or a value nothing expected): the delivery must still
   * end, in a requeue, counted towards a quorum queue's delivery limit so that a message
   * that always fails here ends in the broker's dead-letter queue rather than loop.
   */
  #failed(work: Work, ending: Ending, err: unknown): void {
    try {
      this.#log.error(
        { err: serializeError(err), ...this.#fields(work) },
        'settling a delivery failed; giving it back',
      );
      // Never a second answer for one delivery: the broker closes the channel on that.
      if (!work.answered) this.#requeue(work, ending.outcome !== 'returned');
    } catch (again) {
      this.#log.error(
        { err: serializeError(again) },
        'giving a delivery back failed; the broker redelivers it when its channel ends',
      );
    }
    this.#settled(work);
  }

  #requeue(work: Work, counted: boolean): void {
    work.answered = true;
    this.#opts.consumer.requeue(work.delivery, counted);
  }

  /** Done with this delivery, however it ended. */
  #settled(work: Work): void {
    if (work.tracked && work.key !== undefined) this.#running.delete(work.key);
    this.#inFlight--;
    if (this.#inFlight === 0 && this.#drained !== undefined) {
      const drained = this.#drained;
      this.#drained = undefined;
      drained();
    }
  }

  async #publish(publication: Publication | undefined): Promise<boolean> {
    if (publication === undefined) return true;
    try {
      await this.#opts.publisher.publish(
        publication.exchange,
        publication.routingKey,
        publication.content,
        publication.options,
      );
      return true;
    } catch (err) {
      this.#opts.metrics.publishFailures.inc({
        reason: err instanceof UnroutableError ? 'unroutable' : 'unconfirmed',
      });
      this.#log.error({ err: serializeError(err) }, 'publish failed');
      return false;
    }
  }
}
