// From delivery to settlement: validate the body, run it in the pool, then carry out the
// outcome plan — reply, dead-letter or retry copy confirmed by the broker, and only then
// the ack. One bad message never stops or slows the others: each delivery is its own
// promise. Across a reconnect, a message that comes back while it still runs, or after
// it finished but before its ack reached the broker, is not run a second time.
import type { Logger } from 'pino';
import type { AmqpConsumer, Delivery } from './amqp-consumer.ts';
import type { AmqpPublisher } from './amqp-publisher.ts';
import { type Metrics, UNKNOWN_FUNC } from './metrics.ts';
import { attemptOf, type Ending, type Publication, planOutcome } from './outcome.ts';
import type { WorkerPool } from './pool.ts';
import { RecentIds } from './recent-ids.ts';
import { parseTaskMessage } from './task-message.ts';
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
  /** How many finished-but-unacked message ids to remember (default 10,000). */
  recentIdsCapacity?: number;
}

/** A message being worked on; its delivery is replaced when the broker redelivers it meanwhile. */
interface Work {
  delivery: Delivery;
}

export class Dispatcher {
  readonly #opts: DispatcherOptions;
  readonly #log: Logger;
  readonly #inFlight = new Set<Promise<void>>();
  readonly #running = new Map<string, Work>();
  readonly #finishedUnacked: RecentIds;
  #draining = false;

  constructor(opts: DispatcherOptions) {
    this.#opts = opts;
    this.#log = opts.logger.child({ component: 'dispatcher' });
    this.#finishedUnacked = new RecentIds(opts.recentIdsCapacity ?? 10_000);
  }

  /** Messages received and not yet settled. */
  get inFlight(): number {
    return this.#inFlight.size;
  }

  handle(delivery: Delivery): void {
    const work = this.#process(delivery)
      .catch((err) => this.#log.error({ err }, 'handling a delivery failed'))
      .finally(() => this.#inFlight.delete(work));
    this.#inFlight.add(work);
  }

  /** From now on deliveries go straight back to the queue; resolves when all in flight are settled. */
  async drain(): Promise<void> {
    this.#draining = true;
    while (this.#inFlight.size > 0) await Promise.allSettled([...this.#inFlight]);
  }

  /** True when this redelivery is taken care of without running it again. */
  #settleDuplicate(delivery: Delivery, messageId: string): boolean {
    const { consumer } = this.#opts;
    const fields = { messageId, deliveryTag: delivery.message.fields.deliveryTag };
    if (this.#finishedUnacked.has(messageId)) {
      this.#finishedUnacked.delete(messageId);
      consumer.ack(delivery);
      this.#log.info(fields, 'redelivery of a message that already finished: acked, not run again');
      return true;
    }
    const running = this.#running.get(messageId);
    if (running !== undefined && !consumer.isLive(running.delivery)) {
      running.delivery = delivery;
      this.#log.info(fields, 'redelivery of a message still running: it will be settled when the run ends');
      return true;
    }
    return false;
  }

  async #process(delivery: Delivery): Promise<void> {
    const { consumer } = this.#opts;
    if (this.#draining) {
      consumer.requeue(delivery);
      return;
    }
    const messageId = delivery.message.properties.messageId as string | undefined;
    if (
      messageId !== undefined &&
      delivery.message.fields.redelivered &&
      this.#settleDuplicate(delivery, messageId)
    ) {
      return;
    }
    const work: Work = { delivery };
    const tracked = messageId !== undefined && !this.#running.has(messageId);
    if (tracked) this.#running.set(messageId, work);
    try {
      await this.#run(work, messageId);
    } finally {
      if (tracked) this.#running.delete(messageId);
    }
  }

  async #run(work: Work, messageId: string | undefined): Promise<void> {
    const { pool, consumer, metrics } = this.#opts;
    const { message } = work.delivery;
    const parsed = parseTaskMessage(message.content, pool.funcs, this.#opts.maxMessageBytes);
    const attempt = attemptOf(message);
    let ending: Ending;
    let func: string;
    if (!parsed.ok) {
      ending = { outcome: 'rejected', reason: parsed.reason };
      func = parsed.func !== undefined && pool.funcs.has(parsed.func) ? parsed.func : UNKNOWN_FUNC;
    } else {
      func = parsed.call.func;
      ending = await pool.run({
        ...parsed.call,
        messageId,
        redelivered: message.fields.redelivered,
        attempt,
        wantResult: typeof message.properties.replyTo === 'string' && message.properties.replyTo !== '',
      });
    }

    const retryDelayMs = this.#opts.retryDelaysMs[attempt - 1];
    const plan = planOutcome(message, ending, {
      deadLetterQueue: this.#opts.deadLetterQueue,
      attempt,
      retryQueue: retryDelayMs === undefined ? undefined : retryQueueName(this.#opts.queue, retryDelayMs),
    });
    const log = {
      func,
      messageId,
      deliveryTag: message.fields.deliveryTag,
      redelivered: message.fields.redelivered,
      attempt,
    };
    if (plan.outcome === undefined) {
      consumer.requeue(work.delivery);
      const reason = ending.outcome === 'returned' ? ending.reason : undefined;
      this.#log.info({ ...log, reason }, 'message given back to the queue');
      return;
    }

    const [replied, copied] = await Promise.all([this.#publish(plan.reply), this.#publish(plan.deadLetter)]);
    if (plan.reply !== undefined && !replied) {
      this.#log.error({ ...log, replyTo: plan.reply.routingKey }, 'the reply could not be published');
    }
    if (plan.deadLetter !== undefined) {
      if (!copied) {
        // Not confirmed, so not acked: the message goes back rather than being lost.
        consumer.requeue(work.delivery);
        this.#log.error(
          log,
          'the dead-letter or retry copy was not confirmed; message given back to the queue',
        );
        return;
      }
      if (!plan.retry) metrics.deadLettered.inc({ reason: plan.outcome });
    }
    // The delivery may have been replaced by a redelivery that arrived meanwhile: settle that one.
    if (!consumer.ack(work.delivery) && messageId !== undefined) this.#finishedUnacked.add(messageId);

    metrics.tasksTotal.inc({ func, outcome: plan.outcome });
    const durationMs = 'durationMs' in ending ? ending.durationMs : 0;
    metrics.taskDuration.observe({ func, outcome: plan.outcome }, durationMs / 1000);
    const fields = { ...log, outcome: plan.outcome, durationMs: Math.round(durationMs * 1000) / 1000 };
    if (plan.outcome === 'succeeded') {
      this.#log.info(fields, 'task succeeded');
      return;
    }
    const error =
      ending.outcome === 'rejected' ? ending.reason : 'error' in ending ? ending.error.message : undefined;
    if (plan.retry)
      this.#log.warn({ ...fields, error, retryInMs: retryDelayMs }, `task ${plan.outcome}; retrying`);
    else this.#log.warn({ ...fields, error }, `task ${plan.outcome}`);
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
      this.#log.error({ err }, 'publish failed');
      return false;
    }
  }
}
