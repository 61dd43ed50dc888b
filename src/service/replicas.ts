// A cancel reaches every replica of the queue (README "Cancelling a task"): DELETE
// /tasks/{id} cancels here and tells the others through the control exchange; an order
// from there (another replica's DELETE, or `amqp-concurrency cancel`) cancels here and,
// when it asks, answers on its reply queue. Each replica names itself in what it sends,
// so that it ignores its own orders coming back.
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { Channel } from 'amqplib';
import type { Logger } from 'pino';
import { type ControlOrder, controlExchangeName, ORIGIN_HEADER } from '../amqp/control.ts';
import type { AmqpPublisher } from '../amqp/publisher.ts';
import type { CancelAnswer } from '../http/server.ts';

export interface ReplicasOptions {
  queue: string;
  publisher: Pick<AmqpPublisher, 'publish'>;
  /** Cancels the task here (Dispatcher.cancel): what it found. */
  cancelHere: (messageId: string) => CancelAnswer;
  logger: Logger;
}

export class Replicas {
  /** This replica, in the orders it sends and in its answers. */
  readonly origin = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
  readonly #opts: ReplicasOptions;

  constructor(opts: ReplicasOptions) {
    this.#opts = opts;
  }

  /** Cancels here and on every other replica; what it found here is the answer. */
  cancel(messageId: string): CancelAnswer {
    const result = this.#opts.cancelHere(messageId);
    this.#opts.publisher
      .publish(
        controlExchangeName(this.#opts.queue),
        '',
        Buffer.from(JSON.stringify({ cancel: messageId })),
        {
          contentType: 'application/json',
          headers: { [ORIGIN_HEADER]: this.origin },
        },
      )
      .catch((err: unknown) =>
        this.#opts.logger.warn({ err, messageId }, 'the cancel could not be sent to the other replicas'),
      );
    return result;
  }

  /** An order from the control exchange, on the channel it came on. */
  onOrder(order: ControlOrder, channel: Channel): void {
    if (order.origin === this.origin) return;
    const result = this.#opts.cancelHere(order.cancel);
    if (order.replyTo === undefined) return;
    try {
      channel.sendToQueue(order.replyTo, Buffer.from(JSON.stringify({ replica: this.origin, result })), {
        contentType: 'application/json',
        ...(order.correlationId === undefined ? {} : { correlationId: order.correlationId }),
      });
    } catch (err) {
      this.#opts.logger.warn({ err }, 'the answer to a cancel could not be sent');
    }
  }
}
