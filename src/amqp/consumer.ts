// The consuming connection, after rabbitmq-client's Consumer: ack discipline is decided
// here and nowhere else (the session, session.ts, writes the frames it decides on). A
// delivery is settled only by the session that delivered it, and never once that session
// has ended (RabbitMQ answers a stale tag with a 406 that closes the channel and requeues
// everything on it). A lost connection, a closed channel or a consumer cancelled by the
// broker is followed by a reconnect with backoff, forever.
//
// Why our own loop rather than amqplib's opt-in recovery (connect(..., { recovery })):
// that wrapper reconnects and re-runs a setup function, but it hands back new channels
// behind the old objects, so a delivery cannot tell the channel it came from, and ack
// discipline (never settle a tag from a closed channel) needs exactly that. It also does
// not see a consumer cancelled by the broker, and says nothing /health can use. Here a
// session (session.ts) is connection + channel + consumer + its acks; anything that ends
// it starts the next one with jittered backoff, and each delivery carries its session.
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ConsumeMessage } from 'amqplib';
import type { Logger } from 'pino';
import { ServiceError } from '../errors.ts';
import { backoffDelay } from '../util/backoff.ts';
import { AddressList, type BrokerConnection, isLoginRefused, openConnection } from './connection.ts';
import { ConsumerFlow } from './consumer-flow.ts';
import { ConsumerStart } from './consumer-start.ts';
import { isConsumerTimeoutClose } from './consumer-timeout.ts';
import type { AckMemo, Delivery, LostSession } from './delivery.ts';
import { LoginRefusals } from './login-refusals.ts';
import { ackFlushThreshold } from './prefetch.ts';
import { ConsumerSession } from './session.ts';
import { TimeoutNotices } from './timeout-notices.ts';
import { declareTopology, type Topology } from './topology.ts';
import { redactUrl } from './url.ts';

export type ConsumerState = 'connecting' | 'consuming' | 'reconnecting' | 'cancelled' | 'closed';

export interface ConsumerOptions {
  /** The broker addresses; each reconnect moves on to the next. */
  urls: readonly string[];
  /** The list to take them from, when shared with the publisher (an account list; see connection.ts). */
  addresses?: AddressList;
  /** The deadline of each step of getting a session up (see connection.ts). */
  connectTimeoutMs: number;
  topology: Topology;
  prefetch: number;
  logger: Logger;
  onDelivery: (delivery: Delivery) => void;
  /** A session that delivered has ended: its unsettled deliveries are the broker's again. */
  onChannelLost?: (lost: LostSession) => void;
  /**
   * What to keep of a delivery acked until its ack is proven, for LostSession.uncertain.
   * Not the message: kept past two scavenges (a fence's round trip and more), what is
   * kept is promoted, and whole messages were most of what the master's old generation
   * grew by (docs/benchmarks.md). A body memo keeps the socket read it is a view of, as
   * the message did. Without it, nothing is kept.
   */
  ackMemo?: (message: ConsumeMessage) => AckMemo;
  /** Whether deliveries wait in the owner for a free worker, `workMs` of work for each: acks may wait (ack-flusher.ts). */
  acksMayWait?: (workMs: number) => boolean;
  /** A session is consuming: what else should live on its connection (the control exchange's listener). */
  onConsuming?: (connection: BrokerConnection) => void;
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
  /** The live session: the one whose deliveries may be settled. */
  #session: ConsumerSession | undefined;
  #stopping = false;
  #loop: Promise<void> | undefined;
  /** The prefetch in force and the pause: the changes made to the live consumer. */
  readonly #flow: ConsumerFlow;
  /** The address of the attempt under way, for the log and a refused login. */
  #attempting: string | undefined;
  readonly #refusals: LoginRefusals;
  readonly #timeoutNotices: TimeoutNotices;
  /** basic.consume on a session, as every session and every flow change starts it. */
  readonly #starter: ConsumerStart;
  /** Aborted when stopping: a connect in progress or a backoff is given up at once. */
  readonly #stop = new AbortController();

  constructor(opts: ConsumerOptions) {
    super();
    this.#opts = opts;
    this.#addresses = opts.addresses ?? new AddressList(opts.urls);
    this.#log = opts.logger.child({ component: 'consumer' });
    this.#timeoutNotices = new TimeoutNotices(this.#log, opts.topology);
    this.#refusals = new LoginRefusals(this.#addresses, this.#log);
    this.#starter = new ConsumerStart(opts.topology, this.#timeoutNotices, this.#log, {
      onDelivery: opts.onDelivery,
      onCancelled: (session) => this.#cancelledByBroker(session),
    });
    this.#flow = new ConsumerFlow(
      opts.prefetch,
      {
        session: () => this.#session,
        stopping: () => this.#stopping,
        consume: (session) => this.#starter.start(session),
      },
      this.#log,
    );
  }

  get state(): ConsumerState {
    return this.#state;
  }

  /** The prefetch in force (and applied again on every reconnect). */
  get prefetch(): number {
    return this.#flow.prefetch;
  }

  /** A new prefetch, now and for later sessions: the live consumer is replaced (consumer-flow.ts). */
  setPrefetch(count: number): Promise<void> {
    return this.#flow.setPrefetch(count);
  }

  /** Whether consuming is paused (see pause()). */
  get paused(): boolean {
    return this.#flow.paused;
  }

  /** Stops deliveries and keeps the channel, to settle what is in flight; resume() consumes again. */
  pause(): void {
    this.#flow.pause();
  }

  resume(): void {
    this.#flow.resume();
  }

  get connected(): boolean {
    return this.#session !== undefined && !this.#session.connection.isClosed;
  }

  /** Acks made and not yet written to the socket (they go out within a few ms). */
  get unsentAcks(): number {
    return this.#session?.acks.pending ?? 0;
  }

  /** The broker node of the live session (no password), for /health and logs. */
  get broker(): string | undefined {
    return this.#session?.address;
  }

  /** True while the broker has blocked this connection (a resource alarm). */
  get blocked(): boolean {
    return this.#session?.connection.blocked ?? false;
  }

  /** Starts connecting in the background; progress shows in `state`, failures that retry will not help in 'fatal'. */
  start(): void {
    this.#loop ??= this.#run();
  }

  /** Acks on the delivering session; false when that session has ended (the broker redelivers). */
  ack(delivery: Delivery): boolean {
    if (!this.#isLive(delivery)) return false;
    delivery.session.ack(delivery.message);
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
    return this.#isLive(delivery) && delivery.session.requeue(delivery.message, counted);
  }

  /** Whether the session that delivered it is the live one: only then may it be settled. */
  isLive(delivery: Delivery): boolean {
    return delivery.session === this.#session;
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
    this.#beginStopping();
    await this.#flow.settled;
    const session = this.#session;
    const tag = session?.consumerTag;
    if (session !== undefined && tag !== undefined) {
      session.consumerTag = undefined;
      // Bounded: on a half-dead connection the cancel-ok may never come; then the
      // connection is destroyed and the broker requeues on its own.
      await session.connection
        .step('cancelling the consumer', () => session.channel.cancel(tag))
        .catch((err) => this.#log.warn({ err }, 'cancelling the consumer failed'));
    }
    this.#setState('cancelled');
  }

  async close(): Promise<void> {
    this.#beginStopping();
    const session = this.#session;
    if (session !== undefined) {
      // Send the acks still waiting for their turn before the channel goes.
      session.acks.flush();
      this.#drop(session, false);
      // The channel first: amqplib muxes each channel's frames separately, so a
      // connection close can overtake acks still queued on the channel, and the broker
      // would requeue messages we finished. Closing the channel sends its close after its
      // own acks.
      await session.connection.step('closing the channel', () => session.channel.close()).catch(() => {});
      await session.connection.close();
    }
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
        const { ended } = await this.#open();
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
        const url = this.#attempting;
        if (url !== undefined && isLoginRefused(err)) this.#refusals.refused(url, err);
        else this.#log.warn({ err, broker: url && redactUrl(url) }, 'cannot reach the broker');
      }
      this.#setState(everConsumed ? 'reconnecting' : 'connecting');
      attempt++;
      // With several brokers the next one is tried at once; the backoff grows per round.
      const round = Math.ceil(attempt / this.#addresses.size);
      const delay =
        attempt % this.#addresses.size !== 0 && this.#addresses.size > 1
          ? 0
          : backoffDelay(round, this.#opts.reconnect ?? { initialMs: 200, maxMs: 15_000 });
      await sleep(delay, undefined, { signal: this.#stop.signal }).catch(() => {});
    }
  }

  /**
   * Connects, opens a channel, declares and consumes, each step under the connect
   * deadline; resolves with a promise of the reason the session ends. A failed step
   * destroys the connection: the next attempt starts clean.
   */
  async #open(): Promise<{ ended: Promise<string> }> {
    const url = this.#addresses.next();
    this.#attempting = url;
    const connection = await openConnection(
      url,
      { purpose: 'consume', connectTimeoutMs: this.#opts.connectTimeoutMs, logger: this.#log },
      this.#stop.signal,
    );
    let session: ConsumerSession | undefined;
    const ended = new Promise<string>((resolve) => {
      connection.once('closed', (reason) => {
        if (session !== undefined) this.#drop(session, true);
        resolve(reason);
      });
    });
    try {
      if (this.#stopping) {
        await connection.close();
        return { ended };
      }
      const channel = await connection.step('opening a channel', () => connection.model.createChannel());
      channel.on('error', (err) => {
        if (isConsumerTimeoutClose(String((err as Error).message))) this.#timeoutNotices.timedOut(err);
        else this.#log.warn({ err }, 'channel closed by an error');
      });
      channel.on('close', () => {
        if (session !== undefined) this.#drop(session, true);
        // The connection may live on, but one clean path back is simplest: start over.
        void connection.close();
      });
      const declared = await connection.step('declaring the topology', () =>
        declareTopology(channel, this.#opts.topology, {
          version: connection.serverVersion,
          openChannel: () => connection.model.createChannel(),
        }),
      );
      this.#timeoutNotices.declared(declared);
      await connection.step('setting the prefetch', () => channel.prefetch(this.#flow.prefetch));
      if (this.#stopping) {
        await connection.close();
        return { ended };
      }
      session = new ConsumerSession(connection, channel, ackFlushThreshold(this.#flow.prefetch), {
        memo: this.#opts.ackMemo,
        acksMayWait: this.#opts.acksMayWait,
        // basic.qos with the prefetch in force: cheap, answered in order after the acks.
        run: () => channel.prefetch(this.#flow.prefetch),
        onUnanswered: (waitedMs) => {
          this.#log.warn(
            { waitedMs: Math.round(waitedMs), broker: connection.address },
            'an ack fence went unanswered: the link is dead; reconnecting',
          );
          connection.destroy('an ack fence went unanswered');
        },
      });
      this.#session = session;
      const live = session;
      // Paused (the master holds too much): the session is up, and resume() consumes.
      if (this.#flow.paused) {
        this.#setState('consuming');
        return { ended };
      }
      const consumerTag = await connection.step('starting the consumer', () => this.#starter.start(live));
      if (this.#stopping) {
        // A drain began while basic.consume was on its way: cancel() found no consumer to
        // cancel, so cancel this one now, or it would keep delivering into a draining
        // dispatcher that hands everything straight back.
        await connection.step('cancelling the consumer', () => channel.cancel(consumerTag)).catch(() => {});
        return { ended };
      }
      session.consumerTag = consumerTag;
    } catch (err) {
      connection.destroy('giving up on this attempt');
      throw err;
    }
    this.#refusals.accepted();
    this.#setState('consuming');
    this.#timeoutNotices.connected(connection);
    this.#log.info(
      { queue: this.#opts.topology.queue, prefetch: this.#flow.prefetch, broker: connection.address },
      'consuming',
    );
    this.#opts.onConsuming?.(connection);
    return { ended };
  }

  /**
   * The session has ended (its channel or its connection): forget it. When it had
   * delivered, tell the owner: its deliveries that have not started are the broker's again.
   */
  #drop(session: ConsumerSession, lost: boolean): void {
    const wasLive = this.#session === session;
    if (wasLive) this.#session = undefined;
    if (session.drop() && wasLive && lost)
      this.#opts.onChannelLost?.({ session, uncertain: session.uncertain });
  }

  /**
   * The broker cancelled the consumer. The session ends here, not when the close handshake
   * does: amqplib refuses every ack and nack written meanwhile with a throw. The acks made
   * so far go first, on the channel still open; the rest of its deliveries are the
   * broker's again. The channel closes before the connection (see close()); its close
   * handler closes the connection.
   */
  #cancelledByBroker(session: ConsumerSession): void {
    session.acks.flush();
    this.#drop(session, true);
    void session.connection
      .step('closing the channel', () => session.channel.close())
      .catch(() => session.connection.close());
  }

  /** No new session from now on: a connect in progress is given up, a backoff cut short. */
  #beginStopping(): void {
    this.#stopping = true;
    this.#stop.abort(new Error('connecting was abandoned: the service is stopping'));
  }
}
