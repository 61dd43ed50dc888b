// One consuming session: the connection, its channel, the consumer on it and the acks of
// that channel, created together once a channel is open and dropped together when either
// ends. A delivery carries the session that delivered it; "may this delivery still be
// settled?" is "is its session the consumer's current one?" (a tag from a channel that
// has since closed is answered by RabbitMQ with a 406 that closes the new channel too).
import type { Channel, ConsumeMessage } from 'amqplib';
import { AckFlusher, type Fence } from './ack-flusher.ts';
import type { BrokerConnection } from './connection.ts';
import type { AckMemo } from './delivery.ts';

export class ConsumerSession {
  readonly connection: BrokerConnection;
  readonly channel: Channel;
  readonly acks: AckFlusher;
  /** The live consumer's tag; undefined before basic.consume-ok and after a cancel. */
  consumerTag: string | undefined;
  /**
   * Deliveries acked and not yet proven to have reached the broker (see the fences in
   * ack-flusher.ts), by delivery tag, as the memo kept them: what the session's end
   * reports as uncertain.
   */
  readonly #uncertain = new Map<number, AckMemo>();
  #dropped = false;
  /** What to keep of each; undefined when nothing is kept (no fences: nothing is ever confirmed). */
  readonly #memo: ((message: ConsumeMessage) => AckMemo) | undefined;

  constructor(
    connection: BrokerConnection,
    channel: Channel,
    ackFlushAt: number,
    fence?: Pick<Fence, 'run' | 'onUnanswered'> & {
      memo?: ((message: ConsumeMessage) => AckMemo) | undefined;
      /** Whether acks may wait longer to go out together (AckFlusher's mayWait). */
      acksMayWait?: ((workMs: number) => boolean) | undefined;
    },
  ) {
    this.connection = connection;
    this.channel = channel;
    this.#memo = fence?.memo;
    this.acks = new AckFlusher(
      channel,
      ackFlushAt,
      fence === undefined
        ? undefined
        : {
            run: fence.run,
            onUnanswered: fence.onUnanswered,
            onConfirmed: (tags) => {
              for (const tag of tags) this.#uncertain.delete(tag);
            },
          },
      fence?.acksMayWait,
    );
  }

  /** Acks a delivery of this session; it stays uncertain until a fence covers it. */
  ack(message: ConsumeMessage): void {
    if (this.#memo !== undefined) this.#uncertain.set(message.fields.deliveryTag, this.#memo(message));
    this.acks.ack(message.fields.deliveryTag);
  }

  /**
   * Gives a delivery of this session back to the queue: `basic.reject` when counted,
   * `basic.nack` when not (AmqpConsumer.requeue says which is which). False when the
   * channel has begun to close.
   */
  requeue(message: ConsumeMessage, counted: boolean): boolean {
    this.acks.settled(message.fields.deliveryTag);
    try {
      if (counted) this.channel.reject(message, true);
      else this.channel.nack(message, false, true);
    } catch {
      // The channel or its connection has begun to close (amqplib refuses the write with a
      // throw): the broker requeues the message when the close is done, and the session is
      // dropped when it is.
      return false;
    }
    return true;
  }

  /** What was kept of the messages acked whose acks were never proven to have arrived. */
  get uncertain(): AckMemo[] {
    return [...this.#uncertain.values()];
  }

  /** The broker node, without its password: for logs and /health. */
  get address(): string {
    return this.connection.address;
  }

  get dropped(): boolean {
    return this.#dropped;
  }

  /** The channel or its connection has ended: nothing is sent on it any more. Idempotent. */
  drop(): boolean {
    if (this.#dropped) return false;
    this.#dropped = true;
    this.acks.stop();
    return true;
  }
}
