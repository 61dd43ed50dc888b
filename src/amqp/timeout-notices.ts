// What the consumer tells the operator about the broker's consumer timeout
// (consumer-timeout.ts says why it matters), each thing once: the timeout closed a
// channel while a task ran; the queue keeps an older x-consumer-timeout; this broker
// ignores or refuses ours while the one needed is past its default.
import type { Logger } from 'pino';
import type { BrokerConnection } from './connection.ts';
import {
  BROKER_DEFAULT_CONSUMER_TIMEOUT_MS,
  consumerTimeoutPolicyCommand,
  honoursConsumerTimeout,
} from './consumer-timeout.ts';
import type { ConsumerTimeoutDeclared } from './topology.ts';

export class TimeoutNotices {
  readonly #log: Logger;
  readonly #queue: string;
  /** The consumer timeout the queue needs (undefined: the broker's default will do). */
  readonly #neededMs: number | undefined;
  #saidTimedOut = false;
  #saidKept = false;
  /** The broker version last warned about: once per version. */
  #warnedVersion: string | undefined;

  constructor(log: Logger, topology: { queue: string; consumerTimeoutMs?: number | undefined }) {
    this.#log = log;
    this.#queue = topology.queue;
    this.#neededMs = topology.consumerTimeoutMs;
  }

  /**
   * The broker's consumer timeout closed the channel while a delivery was still held: its
   * messages come back while their tasks run (they are adopted, not run again: see the
   * dispatcher). Said once, as an error, with the value the queue needs and the command.
   */
  timedOut(err: unknown): void {
    if (this.#saidTimedOut) return;
    this.#saidTimedOut = true;
    const needed = this.#neededMs ?? BROKER_DEFAULT_CONSUMER_TIMEOUT_MS;
    const queue = this.#queue;
    this.#log.error(
      { err, queue, neededMs: needed, fix: consumerTimeoutPolicyCommand(queue, needed) },
      `the broker's consumer timeout closed the channel while a task ran: give queue ${queue} a consumer timeout of at least ${needed} ms (the policy command is in "fix"), or raise consumer_timeout in rabbitmq.conf`,
    );
  }

  /**
   * The work queue was declared before with another x-consumer-timeout, or none (an
   * earlier --worker-timeout, an older version of the service): RabbitMQ never changes a
   * queue's arguments. The one on basic.consume beats it, so this is said once, as news.
   */
  declared(declared: ConsumerTimeoutDeclared): void {
    if (declared !== 'kept' || this.#saidKept) return;
    this.#saidKept = true;
    this.#log.info(
      { queue: this.#queue, consumerTimeoutMs: this.#neededMs },
      'the queue keeps the x-consumer-timeout it was declared with (a queue never changes its arguments); this consumer asks for consumerTimeoutMs on basic.consume, which takes precedence',
    );
  }

  /** Connected: a broker older than 3.11.15 ignores x-consumer-timeout, say so (see notTaken). */
  connected(connection: BrokerConnection): void {
    if (!honoursConsumerTimeout(connection.serverVersion))
      this.notTaken(connection, 'ignores x-consumer-timeout');
  }

  /**
   * The broker will not take our consumer timeout: if the one we need is past its
   * default, say so once per broker version, with both values and what to set.
   */
  notTaken(connection: BrokerConnection, why: string): void {
    const wanted = this.#neededMs;
    const version = connection.serverVersion;
    if (
      wanted === undefined ||
      wanted <= BROKER_DEFAULT_CONSUMER_TIMEOUT_MS ||
      this.#warnedVersion === version
    )
      return;
    this.#warnedVersion = version;
    this.#log.warn(
      {
        broker: version,
        neededMs: wanted,
        brokerDefaultMs: BROKER_DEFAULT_CONSUMER_TIMEOUT_MS,
        queue: this.#queue,
      },
      `this RabbitMQ ${why}: give the queue a policy with consumer-timeout, or set consumer_timeout in rabbitmq.conf, of at least neededMs; else a delivery held that long is redelivered while it runs`,
    );
  }
}
