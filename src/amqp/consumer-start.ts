// Starting a consumer on a session's channel: basic.consume with the consumer-timeout
// argument where the broker takes it, and what follows the broker's own cancel. Kept
// apart from the consumer's session loop (consumer.ts) because it is started there and
// again by every prefetch change and resume (consumer-flow.ts), and it remembers one
// thing across sessions: that the broker refused the argument on this queue.
import type { Logger } from 'pino';
import { sendsConsumerTimeout } from './consumer-timeout.ts';
import type { Delivery } from './delivery.ts';
import type { ConsumerSession } from './session.ts';
import type { TimeoutNotices } from './timeout-notices.ts';
import type { Topology } from './topology.ts';

export interface ConsumerStartHooks {
  onDelivery: (delivery: Delivery) => void;
  /**
   * The broker cancelled the consumer (the queue was deleted, a node went away, or from
   * RabbitMQ 4.3 a consumer_timeout on a quorum queue): the session is over.
   */
  onCancelled: (session: ConsumerSession) => void;
}

export class ConsumerStart {
  readonly #topology: Topology;
  readonly #notices: TimeoutNotices;
  readonly #log: Logger;
  readonly #hooks: ConsumerStartHooks;
  /** The broker refused x-consumer-timeout on this queue: consume without it from now on. */
  #timeoutRefused = false;

  constructor(topology: Topology, notices: TimeoutNotices, log: Logger, hooks: ConsumerStartHooks) {
    this.#topology = topology;
    this.#notices = notices;
    this.#log = log;
    this.#hooks = hooks;
  }

  /** Starts a consumer on the queue; its deliveries carry `session`, the one that may settle them. */
  async start(session: ConsumerSession): Promise<string> {
    const { consumerTimeoutMs, queueType } = this.#topology;
    const timeoutMs =
      this.#timeoutRefused || !sendsConsumerTimeout(session.connection.serverVersion, queueType)
        ? undefined
        : consumerTimeoutMs;
    try {
      return await this.#basicConsume(session, timeoutMs);
    } catch (err) {
      // RabbitMQ 4.3.2 and later refuse the argument on a classic queue (406, "invalid
      // arg"): that closed the channel; the next session consumes without it.
      if (timeoutMs !== undefined && /x-consumer-timeout/.test((err as Error).message)) {
        this.#timeoutRefused = true;
        this.#notices.notTaken(session.connection, 'refuses x-consumer-timeout on this queue');
      }
      throw err;
    }
  }

  async #basicConsume(session: ConsumerSession, timeoutMs: number | undefined): Promise<string> {
    const { onDelivery, onCancelled } = this.#hooks;
    const { consumerTag } = await session.channel.consume(
      this.#topology.queue,
      (message) => {
        if (message === null) {
          this.#log.warn('the broker cancelled the consumer; setting up again');
          onCancelled(session);
          return;
        }
        session.acks.delivered(message.fields.deliveryTag);
        onDelivery({ message, session });
      },
      {
        noAck: false,
        ...(timeoutMs === undefined ? {} : { arguments: { 'x-consumer-timeout': timeoutMs } }),
      },
    );
    return consumerTag;
  }
}
