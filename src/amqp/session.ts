// One consuming session: the connection, its channel, the consumer on it and the acks of
// that channel, created together once a channel is open and dropped together when either
// ends. A delivery carries the session that delivered it; "may this delivery still be
// settled?" is "is its session the consumer's current one?" (a tag from a channel that
// has since closed is answered by RabbitMQ with a 406 that closes the new channel too).
import type { Channel, ConsumeMessage } from 'amqplib';
import { AckFlusher, type Fence } from './ack-flusher.ts';
import type { BrokerConnection } from './connection.ts';

export class ConsumerSession {
  readonly connection: BrokerConnection;
  readonly channel: Channel;
  readonly acks: AckFlusher;
  /** The live consumer's tag; undefined before basic.consume-ok and after a cancel. */
  consumerTag: string | undefined;
  /**
   * Deliveries acked and not yet proven to have reached the broker (see the fences in
   * ack-flusher.ts), by delivery tag: what the session's end reports as uncertain.
   */
  readonly #uncertain = new Map<number, ConsumeMessage>();
  #dropped = false;
  /** Whether acks are fenced: without fences nothing is ever confirmed, so nothing is kept. */
  readonly #fenced: boolean;

  constructor(
    connection: BrokerConnection,
    channel: Channel,
    ackFlushAt: number,
    fence?: Pick<Fence, 'run' | 'onUnanswered'>,
  ) {
    this.connection = connection;
    this.channel = channel;
    this.#fenced = fence !== undefined;
    this.acks = new AckFlusher(
      channel,
      ackFlushAt,
      fence === undefined
        ? undefined
        : {
            ...fence,
            onConfirmed: (tags) => {
              for (const tag of tags) this.#uncertain.delete(tag);
            },
          },
    );
  }

  /** Acks a delivery of this session; it stays uncertain until a fence covers it. */
  ack(message: ConsumeMessage): void {
    if (this.#fenced) this.#uncertain.set(message.fields.deliveryTag, message);
    this.acks.ack(message.fields.deliveryTag);
  }

  /** The messages acked whose acks were never proven to have arrived. */
  get uncertain(): ConsumeMessage[] {
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
