// What the live consumer is started with, and whether it consumes at all: the prefetch in
// force and the pause. The consumer (consumer.ts) owns the sessions; this owns the
// changes made to a session's consumer while it lives. Both kinds replace or cancel the
// consumer on the session's channel and keep the channel, so what is in flight is still
// settled on it. They run one at a time, in the order asked: a pause never overtakes the
// swap before it, and a resume never starts a consumer under a stale prefetch.
import type { Logger } from 'pino';
import { ackFlushThreshold } from './prefetch.ts';
import type { ConsumerSession } from './session.ts';

/** What a change needs of the consumer that owns the sessions. */
export interface FlowHost {
  /** The live session: the one a change applies to, if any. */
  session(): ConsumerSession | undefined;
  /** The service is stopping: no consumer is started any more. */
  stopping(): boolean;
  /** Starts a consumer on the session's channel; its consumer tag. */
  consume(session: ConsumerSession): Promise<string>;
}

export class ConsumerFlow {
  readonly #host: FlowHost;
  readonly #log: Logger;
  #prefetch: number;
  #paused = false;
  /** The changes asked so far, chained: each starts when the one before has ended. */
  #changes: Promise<void> = Promise.resolve();

  constructor(prefetch: number, host: FlowHost, log: Logger) {
    this.#prefetch = prefetch;
    this.#host = host;
    this.#log = log;
  }

  /** The prefetch in force (and applied again on every reconnect). */
  get prefetch(): number {
    return this.#prefetch;
  }

  /** Whether consuming is paused (see pause()). */
  get paused(): boolean {
    return this.#paused;
  }

  /** Resolves once every change asked so far has been made or given up. */
  get settled(): Promise<void> {
    return this.#changes;
  }

  /**
   * Changes the prefetch, for the live consumer now and on every later session. basic.qos
   * (per consumer) binds only consumers started after it, so a live consumer is replaced:
   * a new one starts under the new limit, then the old one is cancelled. Both deliver on
   * the same channel, whose tags stay valid, so nothing in flight is disturbed.
   */
  setPrefetch(count: number): Promise<void> {
    this.#prefetch = count;
    const session = this.#host.session();
    if (session !== undefined) session.acks.flushAt = ackFlushThreshold(count);
    this.#changes = this.#changes.then(() => this.#swap(count));
    return this.#changes;
  }

  async #swap(count: number): Promise<void> {
    const session = this.#host.session();
    const oldTag = session?.consumerTag;
    if (session === undefined || oldTag === undefined || this.#host.stopping()) return;
    const { connection, channel } = session;
    try {
      await connection.step('setting the prefetch', () => channel.prefetch(count));
      if (this.#host.session() !== session || this.#host.stopping()) return;
      session.consumerTag = await connection.step('starting a consumer', () => this.#host.consume(session));
      await connection.step('cancelling the old consumer', () => channel.cancel(oldTag));
    } catch (err) {
      // The channel is going: the next session applies the new prefetch.
      this.#log.warn({ err }, 'changing the prefetch failed');
    }
  }

  /**
   * Stops new deliveries for now (basic.cancel) and keeps the channel, so that what is in
   * flight is still settled on it; resume() starts a consumer again. Used when the master
   * holds more bytes than its budget: the broker keeps the rest.
   */
  pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#changes = this.#changes.then(async () => {
      const session = this.#host.session();
      const tag = session?.consumerTag;
      if (session === undefined || tag === undefined || !this.#paused) return;
      session.consumerTag = undefined;
      await session.connection
        .step('pausing the consumer', () => session.channel.cancel(tag))
        .catch((err) => this.#log.warn({ err }, 'pausing the consumer failed'));
    });
  }

  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.#changes = this.#changes.then(async () => {
      const session = this.#host.session();
      if (session === undefined || session.consumerTag !== undefined || this.#paused || this.#host.stopping())
        return;
      try {
        // The prefetch may have changed while paused: basic.qos binds the consumer started next.
        await session.connection.step('setting the prefetch', () => session.channel.prefetch(this.#prefetch));
        session.consumerTag = await session.connection.step('resuming the consumer', () =>
          this.#host.consume(session),
        );
      } catch (err) {
        this.#log.warn({ err }, 'resuming the consumer failed');
      }
    });
  }
}
