// The consuming connection, after rabbitmq-client's Consumer: ack discipline lives here
// and nowhere else. A delivery is settled only on the channel that delivered it, and
// never once that channel has closed (RabbitMQ answers a stale tag with a 406 that closes
// the channel and requeues everything on it). A lost connection, a closed channel or a
// consumer cancelled by the broker is followed by a reconnect with backoff, forever.
//
// Why our own loop rather than amqplib's opt-in recovery (connect(..., { recovery })):
// that wrapper reconnects and re-runs a setup function, but it hands back new channels
// behind the old objects, so a delivery cannot tell the channel it came from, and ack
// discipline (never settle a tag from a closed channel) needs exactly that. It also does
// not see a consumer cancelled by the broker, and says nothing /health can use. Here a
// session is connection + channel + topology + consume; anything that ends it starts
// the next one with jittered backoff, and each delivery carries its own channel.
import { EventEmitter } from 'node:events';
import type { Channel, ConsumeMessage } from 'amqplib';
import type { Logger } from 'pino';
import { AckBatch } from './ack-batch.ts';
import { AddressList, type BrokerConnection, openConnection } from './amqp-connection.ts';
import { backoffDelay } from './backoff.ts';
import { redactUrl } from './config.ts';
import { BROKER_DEFAULT_CONSUMER_TIMEOUT_MS, honoursConsumerTimeout } from './consumer-timeout.ts';
import { ServiceError } from './errors.ts';
import { declareTopology, type Topology } from './topology.ts';

/** How long an ack may wait to go out with others (see ack()). */
const ACK_DELAY_MS = 1;
/** How long a delivery may hold back the acks above it before they go out alone (see #flushTimed). */
const ACK_HOLD_MS = 5;

/** A quarter of the prefetch window (256 when it is unlimited). */
function flushAtFor(prefetch: number): number {
  return prefetch > 0 ? Math.max(1, Math.floor(prefetch / 4)) : 256;
}

export interface Delivery {
  message: ConsumeMessage;
  /** The channel that delivered it: the only one that may settle it. */
  channel: Channel;
}

export type ConsumerState = 'connecting' | 'consuming' | 'reconnecting' | 'cancelled' | 'closed';

export interface ConsumerOptions {
  /** The broker addresses; each reconnect moves on to the next. */
  urls: readonly string[];
  /** The deadline of each step of getting a session up (see amqp-connection.ts). */
  connectTimeoutMs: number;
  topology: Topology;
  prefetch: number;
  logger: Logger;
  onDelivery: (delivery: Delivery) => void;
  /** x-consumer-timeout for basic.consume (see consumer-timeout.ts); none when undefined. */
  consumerTimeoutMs?: number;
  /** A channel that delivered has closed: its unsettled deliveries are the broker's again. */
  onChannelLost?: () => void;
  reconnect?: { initialMs: number; maxMs: number };
}

type ConsumerEvents = {
  state: [state: ConsumerState];
  reconnected: [];
  fatal: [err: ServiceError];
};

export class AmqpConsumer extends EventEmitter<ConsumerEvents> {
  readonly #opts: ConsumerOptions;
  readonly #addresses: AddressList;
  readonly #log: Logger;
  #state: ConsumerState = 'connecting';
  #connection: BrokerConnection | undefined;
  #channel: Channel | undefined;
  #consumerTag: string | undefined;
  #stopping = false;
  #wake: (() => void) | undefined;
  #loop: Promise<void> | undefined;
  #prefetch: number;
  /** The acks of the live channel; a new channel starts a new batch. */
  #acks = new AckBatch();
  #flushSoon: NodeJS.Immediate | undefined;
  #flushLater: NodeJS.Timeout | undefined;
  /** The lowest unsettled delivery at the last timed flush, and since when it has been. */
  #lowest: { tag: number | undefined; since: number } = { tag: undefined, since: 0 };
  /** A prefetch change in progress (the consumer being replaced); changes run one at a time. */
  #swapping: Promise<void> = Promise.resolve();
  /** Acks waiting that make a flush worth it at once. */
  #flushAt: number;
  /** The address that could not be reached, for the log. */
  #connecting: string | undefined;
  #warnedVersion: string | undefined;
  /** The broker refused x-consumer-timeout on this queue: consume without it from now on. */
  #timeoutRefused = false;
  /** Aborted when stopping: a connect in progress is given up at once. */
  readonly #stop = new AbortController();

  constructor(opts: ConsumerOptions) {
    super();
    this.#opts = opts;
    this.#prefetch = opts.prefetch;
    this.#flushAt = flushAtFor(opts.prefetch);
    this.#addresses = new AddressList(opts.urls);
    this.#log = opts.logger.child({ component: 'consumer' });
  }

  get state(): ConsumerState {
    return this.#state;
  }

  /** The prefetch in force (and applied again on every reconnect). */
  get prefetch(): number {
    return this.#prefetch;
  }

  /**
   * Changes the prefetch, for the live consumer now and on every later channel. basic.qos
   * (per consumer) binds only consumers started after it, so a live consumer is replaced:
   * a new one starts under the new limit, then the old one is cancelled. Both deliver on
   * the same channel, whose tags stay valid, so nothing in flight is disturbed.
   */
  setPrefetch(count: number): Promise<void> {
    this.#prefetch = count;
    this.#flushAt = flushAtFor(count);
    this.#swapping = this.#swapping.then(() => this.#swapConsumer(count));
    return this.#swapping;
  }

  async #swapConsumer(count: number): Promise<void> {
    const channel = this.#channel;
    const connection = this.#connection;
    const oldTag = this.#consumerTag;
    if (channel === undefined || connection === undefined || oldTag === undefined || this.#stopping) return;
    try {
      await connection.step('setting the prefetch', () => channel.prefetch(count));
      if (this.#channel !== channel || this.#stopping) return;
      this.#consumerTag = await connection.step('starting a consumer', () =>
        this.#consume(channel, connection, this.#acks),
      );
      await connection.step('cancelling the old consumer', () => channel.cancel(oldTag));
    } catch (err) {
      // The channel is going: the next session applies the new prefetch.
      this.#log.warn({ err }, 'changing the prefetch failed');
    }
  }

  get connected(): boolean {
    return this.#connection !== undefined && !this.#connection.isClosed;
  }

  /** Acks made and not yet written to the socket (they go out within a few ms). */
  get unsentAcks(): number {
    return this.#acks.pending;
  }

  /** The broker node of the live connection (no password), for /health and logs. */
  get broker(): string | undefined {
    return this.#connection?.address;
  }

  /** True while the broker has blocked this connection (a resource alarm). */
  get blocked(): boolean {
    return this.#connection?.blocked ?? false;
  }

  /** Starts connecting in the background; progress shows in `state`, failures that retry will not help in 'fatal'. */
  start(): void {
    this.#loop ??= this.#run();
  }

  /**
   * Acks on the delivering channel; false when that channel is gone (the broker
   * redelivers). Acks go out together (see AckBatch): at the end of the turn once a
   * quarter of the prefetch window waits on them, else within ACK_DELAY_MS. Each ack
   * frame is a write and a wake-up of the broker; an ack that waits a moment costs only
   * window, which the quarter bounds.
   */
  ack(delivery: Delivery): boolean {
    if (!this.#isLive(delivery)) return false;
    this.#acks.ack(delivery.message.fields.deliveryTag);
    if (this.#acks.pending >= this.#flushAt) this.#flushSoon ??= setImmediate(() => this.#flushAcks(true));
    else this.#flushLater ??= setTimeout(() => this.#flushTimed(), ACK_DELAY_MS);
    return true;
  }

  /**
   * Gives the message back to the queue. Not counted (a drain, a shrinking window, a
   * task not started) is `basic.nack`; counted (the message's own fault: a crash, a
   * timeout or a settlement that failed, when it could not be dead-lettered) is
   * `basic.reject`, which from RabbitMQ 4.3 is the only one a quorum queue's delivery
   * limit counts (before 4.3 both count).
   */
  requeue(delivery: Delivery, counted = false): boolean {
    if (!this.#isLive(delivery)) return false;
    this.#acks.settled(delivery.message.fields.deliveryTag);
    if (counted) delivery.channel.reject(delivery.message, true);
    else delivery.channel.nack(delivery.message, false, true);
    return true;
  }

  /**
   * The timed flush: a multiple ack for what it can cover, and the acks held above a
   * delivery still running go out alone only once that delivery has been the lowest
   * unsettled for ACK_HOLD_MS: a task that long is not about to finish, and must not hold
   * the window shut. Tasks queued behind a short one finish first and are covered.
   */
  #flushTimed(): void {
    this.#flushLater = undefined;
    const lowest = this.#acks.lowestUnsettled;
    const now = performance.now();
    if (lowest !== this.#lowest.tag) this.#lowest = { tag: lowest, since: now };
    this.#flushAcks(now - this.#lowest.since < ACK_HOLD_MS);
  }

  /** Sends the acks made so far; `holdBack` keeps those above a delivery still running. */
  #flushAcks(holdBack: boolean): void {
    clearImmediate(this.#flushSoon);
    this.#flushSoon = undefined;
    if (!holdBack) {
      clearTimeout(this.#flushLater);
      this.#flushLater = undefined;
    }
    const channel = this.#channel;
    const { upTo, singles } = this.#acks.take({ holdBack });
    if (channel === undefined) return; // the channel died: the broker redelivers
    if (this.#acks.pending > 0) this.#flushLater ??= setTimeout(() => this.#flushTimed(), ACK_DELAY_MS);
    // amqplib reads only the delivery tag of the message it is given.
    if (upTo !== undefined) channel.ack({ fields: { deliveryTag: upTo } } as ConsumeMessage, true);
    for (const tag of singles) channel.ack({ fields: { deliveryTag: tag } } as ConsumeMessage, false);
  }

  /** Whether the channel that delivered it is still ours and open: only then may it be settled. */
  isLive(delivery: Delivery): boolean {
    return delivery.channel === this.#channel;
  }

  #isLive(delivery: Delivery): boolean {
    const live = this.isLive(delivery);
    if (!live) {
      this.#log.debug(
        { deliveryTag: delivery.message.fields.deliveryTag },
        'not settling: its channel has closed',
      );
    }
    return live;
  }

  /** Stops new deliveries (basic.cancel) but keeps the channel open to settle what is in flight. */
  async cancel(): Promise<void> {
    this.#stopping = true;
    this.#stop.abort();
    this.#wake?.();
    await this.#swapping;
    const channel = this.#channel;
    const connection = this.#connection;
    const tag = this.#consumerTag;
    this.#consumerTag = undefined;
    if (channel !== undefined && connection !== undefined && tag !== undefined) {
      // Bounded: on a half-dead connection the cancel-ok may never come; then the
      // connection is destroyed and the broker requeues on its own.
      await connection
        .step('cancelling the consumer', () => channel.cancel(tag))
        .catch((err) => this.#log.warn({ err }, 'cancelling the consumer failed'));
    }
    this.#setState('cancelled');
  }

  async close(): Promise<void> {
    this.#stopping = true;
    this.#stop.abort();
    this.#wake?.();
    // Send the acks still waiting for their turn before the channel goes.
    this.#flushAcks(false);
    const connection = this.#connection;
    const channel = this.#channel;
    this.#connection = undefined;
    this.#channel = undefined;
    // The channel first: amqplib muxes each channel's frames separately, so a connection
    // close can overtake acks still queued on the channel, and the broker would requeue
    // messages we finished. Closing the channel sends its close after its own acks.
    if (channel !== undefined && connection !== undefined)
      await connection.step('closing the channel', () => channel.close()).catch(() => {});
    await connection?.close();
    // A session still connecting ends at its own deadline; the loop sees #stopping.
    await this.#loop;
    this.#setState('closed');
  }

  #setState(state: ConsumerState): void {
    if (this.#state === state) return;
    this.#state = state;
    this.emit('state', state);
  }

  async #run(): Promise<void> {
    let attempt = 0;
    let everConsumed = false;
    while (!this.#stopping) {
      try {
        const { ended } = await this.#session();
        if (this.#stopping) break;
        if (everConsumed) this.emit('reconnected');
        everConsumed = true;
        attempt = 0;
        const reason = await ended;
        if (this.#stopping) break;
        this.#log.warn({ reason }, 'lost the broker; reconnecting');
      } catch (err) {
        if (err instanceof ServiceError && err.code === 'ERR_TOPOLOGY') {
          this.emit('fatal', err);
          return;
        }
        if (this.#stopping) break;
        this.#log.warn(
          {
            err: { message: (err as Error).message, code: (err as { code?: unknown }).code },
            broker: this.#connecting,
          },
          'cannot reach the broker',
        );
        this.#dropConnection();
      }
      this.#setState(everConsumed ? 'reconnecting' : 'connecting');
      attempt++;
      // With several brokers the next one is tried at once; the backoff grows per round.
      const round = Math.ceil(attempt / this.#addresses.size);
      const delay =
        attempt % this.#addresses.size !== 0 && this.#addresses.size > 1
          ? 0
          : backoffDelay(round, this.#opts.reconnect ?? { initialMs: 200, maxMs: 15_000 });
      await this.#sleep(delay);
    }
  }

  /**
   * Connects, declares and consumes, each step under the connect deadline; resolves with
   * a promise of the reason it ends.
   */
  async #session(): Promise<{ ended: Promise<string> }> {
    const url = this.#addresses.next();
    const connection = await openConnection(
      url,
      { purpose: 'consume', connectTimeoutMs: this.#opts.connectTimeoutMs, logger: this.#log },
      this.#stop.signal,
    ).catch((err) => {
      this.#connecting = redactUrl(url);
      throw err;
    });
    this.#connection = connection;
    const ended = new Promise<string>((resolve) => {
      connection.once('closed', (reason) => {
        this.#lose(connection, undefined);
        resolve(reason);
      });
    });
    if (this.#stopping) {
      await connection.close();
      return { ended };
    }

    const channel = await connection.step('opening a channel', () => connection.model.createChannel());
    channel.on('error', (err) =>
      this.#log.warn({ err: { message: err.message } }, 'channel closed by an error'),
    );
    channel.on('close', () => {
      this.#lose(connection, channel);
      // The connection may live on, but one clean path back is simplest: start over.
      void connection.close();
    });
    await connection.step('declaring the topology', () => declareTopology(channel, this.#opts.topology));
    await connection.step('setting the prefetch', () => channel.prefetch(this.#prefetch));
    if (this.#stopping) {
      await connection.close();
      return { ended };
    }
    this.#channel = channel;
    this.#acks = new AckBatch();
    const acks = this.#acks;
    const consumerTag = await connection.step('starting the consumer', () =>
      this.#consume(channel, connection, acks),
    );
    if (this.#stopping) {
      // A drain began while basic.consume was on its way: cancel() found no consumer to
      // cancel, so cancel this one now, or it would keep delivering into a draining
      // dispatcher that hands everything straight back.
      await connection.step('cancelling the consumer', () => channel.cancel(consumerTag)).catch(() => {});
      return { ended };
    }
    this.#consumerTag = consumerTag;
    this.#setState('consuming');
    this.#warnIfTimeoutIgnored(connection);
    this.#log.info(
      { queue: this.#opts.topology.queue, prefetch: this.#prefetch, broker: connection.address },
      'consuming',
    );
    return { ended };
  }

  /** A broker older than 3.11.15 ignores x-consumer-timeout: say so (see #warnTimeout). */
  #warnIfTimeoutIgnored(connection: BrokerConnection): void {
    if (!honoursConsumerTimeout(connection.serverVersion))
      this.#warnTimeout(connection, 'ignores x-consumer-timeout');
  }

  /**
   * The broker will not take our consumer timeout: if the one we need is past its
   * default, say so once per broker version, with both values and what to set.
   */
  #warnTimeout(connection: BrokerConnection, why: string): void {
    const wanted = this.#opts.consumerTimeoutMs;
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
        queue: this.#opts.topology.queue,
      },
      `this RabbitMQ ${why}: give the queue a policy with consumer-timeout, or set consumer_timeout in rabbitmq.conf, of at least neededMs; else a delivery held that long is redelivered while it runs`,
    );
  }

  /**
   * The channel (or the whole connection) has gone: forget it, and tell the owner, whose
   * deliveries from it that have not started are now the broker's again.
   */
  #lose(connection: BrokerConnection, channel: Channel | undefined): void {
    const hadChannel = this.#channel !== undefined && (channel === undefined || this.#channel === channel);
    if (hadChannel) this.#channel = undefined;
    if (channel === undefined && this.#connection === connection) this.#connection = undefined;
    if (hadChannel) this.#opts.onChannelLost?.();
  }

  /** Starts a consumer on the queue; its deliveries carry `channel`, the one that may settle them. */
  async #consume(channel: Channel, connection: BrokerConnection, acks: AckBatch): Promise<string> {
    const timeoutMs = this.#timeoutRefused ? undefined : this.#opts.consumerTimeoutMs;
    try {
      return await this.#basicConsume(channel, connection, acks, timeoutMs);
    } catch (err) {
      // RabbitMQ 4.3.2 and later refuse the argument on a classic queue (406, "invalid
      // arg"): that closed the channel; the next session consumes without it.
      if (timeoutMs !== undefined && /x-consumer-timeout/.test((err as Error).message)) {
        this.#timeoutRefused = true;
        this.#warnTimeout(connection, 'refuses x-consumer-timeout on this queue');
      }
      throw err;
    }
  }

  async #basicConsume(
    channel: Channel,
    connection: BrokerConnection,
    acks: AckBatch,
    timeoutMs: number | undefined,
  ): Promise<string> {
    const { consumerTag } = await channel.consume(
      this.#opts.topology.queue,
      (message) => {
        if (message === null) {
          // The broker cancelled us (the queue was deleted, a node went away, or from
          // RabbitMQ 4.3 a consumer_timeout on a quorum queue): set up again.
          this.#log.warn('the broker cancelled the consumer; setting up again');
          void connection.close();
          return;
        }
        acks.delivered(message.fields.deliveryTag);
        this.#opts.onDelivery({ message, channel });
      },
      {
        noAck: false,
        ...(timeoutMs === undefined ? {} : { arguments: { 'x-consumer-timeout': timeoutMs } }),
      },
    );
    return consumerTag;
  }

  #dropConnection(): void {
    const connection = this.#connection;
    this.#connection = undefined;
    this.#channel = undefined;
    connection?.destroy('giving up on this attempt');
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.#wake = done;
    });
  }
}
