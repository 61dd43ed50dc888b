// From delivery to settlement: validate the body, run it in the pool, then carry out the
// outcome plan — reply, dead-letter copy confirmed by the broker, and only then the ack.
// One bad message never stops or slows the others: each delivery is its own promise.
import type { Logger } from 'pino';
import type { AmqpConsumer, Delivery } from './amqp-consumer.ts';
import type { AmqpPublisher } from './amqp-publisher.ts';
import { type Metrics, UNKNOWN_FUNC } from './metrics.ts';
import { type Ending, type Publication, planOutcome } from './outcome.ts';
import type { WorkerPool } from './pool.ts';
import { parseTaskMessage } from './task-message.ts';

export interface DispatcherOptions {
  pool: WorkerPool;
  consumer: Pick<AmqpConsumer, 'ack' | 'requeue'>;
  publisher: Pick<AmqpPublisher, 'publish'>;
  metrics: Metrics;
  logger: Logger;
  deadLetterQueue: string;
  maxMessageBytes: number;
}

export class Dispatcher {
  readonly #opts: DispatcherOptions;
  readonly #log: Logger;
  readonly #inFlight = new Set<Promise<void>>();
  #draining = false;

  constructor(opts: DispatcherOptions) {
    this.#opts = opts;
    this.#log = opts.logger.child({ component: 'dispatcher' });
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

  async #process(delivery: Delivery): Promise<void> {
    const { pool, consumer, metrics } = this.#opts;
    const { message } = delivery;
    if (this.#draining) {
      consumer.requeue(delivery);
      return;
    }
    const parsed = parseTaskMessage(message.content, pool.funcs, this.#opts.maxMessageBytes);
    const messageId = message.properties.messageId as string | undefined;
    const attempt = 1;
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

    const plan = planOutcome(message, ending, { deadLetterQueue: this.#opts.deadLetterQueue, attempt });
    const log = {
      func,
      messageId,
      deliveryTag: message.fields.deliveryTag,
      redelivered: message.fields.redelivered,
    };
    if (plan.outcome === undefined) {
      consumer.requeue(delivery);
      this.#log.info(
        { ...log, reason: ending.outcome === 'returned' ? ending.reason : undefined },
        'message given back to the queue',
      );
      return;
    }

    const [replied, deadLettered] = await Promise.all([
      this.#publish(plan.reply),
      this.#publish(plan.deadLetter),
    ]);
    if (plan.reply !== undefined && !replied)
      this.#log.error({ ...log, replyTo: plan.reply.routingKey }, 'the reply could not be published');
    if (plan.deadLetter !== undefined) {
      if (!deadLettered) {
        // Not confirmed, so not acked: the message goes back rather than being lost.
        consumer.requeue(delivery);
        this.#log.error(log, 'the dead-letter copy was not confirmed; message given back to the queue');
        return;
      }
      metrics.deadLettered.inc({ reason: plan.outcome });
    }
    consumer.ack(delivery);

    metrics.tasksTotal.inc({ func, outcome: plan.outcome });
    const durationMs = 'durationMs' in ending ? ending.durationMs : 0;
    metrics.taskDuration.observe({ func, outcome: plan.outcome }, durationMs / 1000);
    const fields = { ...log, outcome: plan.outcome, durationMs: Math.round(durationMs * 1000) / 1000 };
    if (plan.outcome === 'succeeded') this.#log.info(fields, 'task succeeded');
    else {
      const error =
        ending.outcome === 'rejected' ? ending.reason : 'error' in ending ? ending.error.message : undefined;
      this.#log.warn({ ...fields, error }, `task ${plan.outcome}`);
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
      this.#log.error({ err }, 'publish failed');
      return false;
    }
  }
}
