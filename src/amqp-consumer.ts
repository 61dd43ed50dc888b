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
import amqp, { type Channel, type ChannelModel, type ConsumeMessage } from 'amqplib';
import type { Logger } from 'pino';
import { AckBatch } from './ack-batch.ts';
import { socketOptions, withHeartbeat } from './amqp-url.ts';
import { backoffDelay } from './backoff.ts';
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
  url: string;
  topology: Topology;
  prefetch: number;
  logger: Logger;
  onDelivery: (delivery: Delivery) => void;
  reconnect?: { initialMs: number; maxMs: number };
}

type ConsumerEvents = {
  state: [state: ConsumerState];
  reconnected: [];
  fatal: [err: ServiceError];
};

export class AmqpConsumer extends EventEmitter<ConsumerEvents> {
  readonly #opts: ConsumerOptions;
  readonly #url: string;
  readonly #log: Logger;
  #state: ConsumerState = 'connecting';
  #connection: ChannelModel | undefined;
  #channel: Channel | undefined;
  #consumerTag: string | undefined;
  #stopping = false;
  #wake: (() => void) | undefined;
  #loop: Promise<void> | undefined;
  #blocked = false;
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

  constructor(opts: ConsumerOptions) {
    super();
    this.#opts = opts;
    this.#prefetch = opts.prefetch;
    this.#flushAt = flushAtFor(opts.prefetch);
    this.#url = withHeartbeat(opts.url);
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
      await channel.prefetch(count);
      if (this.#channel !== channel || this.#stopping) return;
      this.#consumerTag = await this.#consume(channel, connection, this.#acks);
      await channel.cancel(oldTag);
    } catch (err) {
      // The channel is going: the next session applies the new prefetch.
      this.#log.warn({ err }, 'changing the prefetch failed');
    }
  }

  get connected(): boolean {
    return this.#connection !== undefined;
  }

  /** True while the broker has blocked this connection (a resource alarm). */
  get blocked(): boolean {
    return this.#blocked;
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

  /** Gives the message back to the queue (shutdown, a task not started). */
  requeue(delivery: Delivery): boolean {
    if (!this.#isLive(delivery)) return false;
    this.#acks.settled(delivery.message.fields.deliveryTag);
    delivery.channel.nack(delivery.message, false, true);
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
    this.#wake?.();
    await this.#swapping;
    const channel = this.#channel;
    const tag = this.#consumerTag;
    this.#consumerTag = undefined;
    if (channel !== undefined && tag !== undefined) {
      // Bounded: on a half-dead connection the cancel-ok may never come; then the broker
      // requeues on its own when the connection goes.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        channel.cancel(tag).catch((err) => this.#log.warn({ err }, 'cancelling the consumer failed')),
        new Promise((resolve) => {
          timer = setTimeout(resolve, 5_000);
        }),
      ]);
      clearTimeout(timer);
    }
    this.#setState('cancelled');
  }

  async close(): Promise<void> {
    this.#stopping = true;
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
    if (channel !== undefined) await channel.close().catch(() => {});
    if (connection !== undefined) await connection.close().catch(() => {});
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
          { err: { message: (err as Error).message, code: (err as { code?: unknown }).code } },
          'cannot reach the broker',
        );
        await this.#dropConnection();
      }
      this.#setState(everConsumed ? 'reconnecting' : 'connecting');
      attempt++;
      await this.#sleep(backoffDelay(attempt, this.#opts.reconnect ?? { initialMs: 200, maxMs: 15_000 }));
    }
  }

  /** Connects, declares and consumes; resolves with a promise of the reason it ends. */
  async #session(): Promise<{ ended: Promise<string> }> {
    const connection = await amqp.connect(this.#url, socketOptions('consume'));
    this.#connection = connection;
    let endSession: (reason: string) => void = () => {};
    const ended = new Promise<string>((resolve) => {
      endSession = resolve;
    });
    connection.on('error', (err) => this.#log.warn({ err: { message: err.message } }, 'connection error'));
    connection.on('close', () => {
      if (this.#connection === connection) {
        this.#connection = undefined;
        this.#channel = undefined;
      }
      this.#blocked = false;
      endSession('connection closed');
    });
    connection.on('blocked', (reason) => {
      this.#blocked = true;
      this.#log.warn({ reason }, 'the broker blocked the consuming connection (resource alarm)');
    });
    connection.on('unblocked', () => {
      this.#blocked = false;
    });

    const channel = await connection.createChannel();
    channel.on('error', (err) =>
      this.#log.warn({ err: { message: err.message } }, 'channel closed by an error'),
    );
    channel.on('close', () => {
      if (this.#channel === channel) this.#channel = undefined;
      // The connection may live on, but one clean path back is simplest: start over.
      connection.close().catch(() => {});
      endSession('channel closed');
    });
    await declareTopology(channel, this.#opts.topology);
    await channel.prefetch(this.#prefetch);
    if (this.#stopping) {
      await connection.close().catch(() => {});
      return { ended };
    }
    this.#channel = channel;
    this.#acks = new AckBatch();
    const acks = this.#acks;
    const consumerTag = await this.#consume(channel, connection, acks);
    this.#consumerTag = consumerTag;
    this.#setState('consuming');
    this.#log.info({ queue: this.#opts.topology.queue, prefetch: this.#prefetch }, 'consuming');
    return { ended };
  }

  /** Starts a consumer on the queue; its deliveries carry `channel`, the one that may settle them. */
  async #consume(channel: Channel, connection: ChannelModel, acks: AckBatch): Promise<string> {
    const { consumerTag } = await channel.consume(
      this.#opts.topology.queue,
      (message) => {
        if (message === null) {
          // The broker cancelled us (the queue was deleted, a node went away): set up again.
          this.#log.warn('the broker cancelled the consumer; setting up again');
          connection.close().catch(() => {});
          return;
        }
        acks.delivered(message.fields.deliveryTag);
        this.#opts.onDelivery({ message, channel });
      },
      { noAck: false },
    );
    return consumerTag;
  }

  async #dropConnection(): Promise<void> {
    const connection = this.#connection;
    this.#connection = undefined;
    this.#channel = undefined;
    if (connection !== undefined) await connection.close().catch(() => {});
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
