// From delivery to run: take each delivery, validate its body, and start its run in the
// pool; cancel by message id; write down the delivery on the stack when the master dies.
// What happens after the run (the outcome carried out, the copies confirmed, the ack) is
// settlement.ts's. One bad message never stops or slows the others: each delivery is
// handled on its own. Across a reconnect, a message that comes back while it still runs,
// or after it finished but before its ack reached the broker, is not run a second time
// (redeliveries.ts); what its dead channel delivered and had not started is dropped (the
// broker has it again).
//
// Speed: this is the master's per-task path. A task with nothing to publish (no reply_to,
// succeeded) is settled synchronously when the pool's promise resolves: no async chain, no
// log fields built for a level that is off (see also task-metrics.ts).
import type { Logger } from 'pino';
import type { AmqpConsumer } from '../amqp/consumer.ts';
import type { Delivery, LostSession } from '../amqp/delivery.ts';
import type { AmqpPublisher } from '../amqp/publisher.ts';
import { serializeError, taskFailure } from '../errors.ts';
import { stringifyExact } from '../ipc/exact-json.ts';
import { type Metrics, UNKNOWN_FUNC } from '../metrics/metrics.ts';
import type { Pool, TaskRequest } from '../pool/pool.ts';
import type { TaskTracer } from '../telemetry/task-tracer.ts';
import { type CrashJournal, crashKey } from './crash-journal.ts';
import { delayOf } from './delay-header.ts';
import { attemptOf } from './outcome.ts';
import { RecentIds } from './recent-ids.ts';
import { Redeliveries } from './redeliveries.ts';
import { Settlement } from './settlement.ts';
import { parseTaskMessage, type TaskCall } from './task-message.ts';
import { dedupeKey, logFields, type Work } from './work.ts';

export interface DispatcherOptions {
  pool: Pool;
  consumer: Pick<AmqpConsumer, 'ack' | 'requeue' | 'isLive'>;
  publisher: Pick<AmqpPublisher, 'publish'>;
  metrics: Metrics;
  logger: Logger;
  queue: string;
  deadLetterQueue: string;
  maxMessageBytes: number;
  /** The delay of retry k at index k-1; empty when retries are off. */
  retryDelaysMs: readonly number[];
  /**
   * --retry-delay and --retry-delay-max in ms, for a function that declares retries of its
   * own with only some of the options (default 1 s and 300 s).
   */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** How many cancelled message ids to remember for their later deliveries (default 10,000). */
  cancelledIdsCapacity?: number;
  /** How long to remember one (default 3 hours, as Celery keeps revoked ids). */
  cancelledIdsTtlMs?: number;
  /** How many finished-but-unacked deliveries to remember (default 10,000). */
  recentIdsCapacity?: number;
  /** How long to remember one (default 5 minutes; see dedupeKey). */
  recentIdsTtlMs?: number;
  /** Where deaths of the master while handling a message are written down (classic queues). */
  crashJournal?: CrashJournal;
  /** The bytes of message bodies the master may hold in flight before consuming pauses (default: no limit). */
  heldBytesBudget?: number;
  /** Held bytes passed the budget (true), or came back under half of it (false). */
  onPressure?: (over: boolean) => void;
  /**
   * The work queue is a quorum queue with a delivery limit: an adopted redelivery is
   * renewed (redeliveries.ts), so that returns that were not the message's fault (a broker's
   * consumer timeout that cannot be lifted, a lost connection) never dead-letter a message
   * that runs here.
   */
  renewAdopted?: boolean;
  /** One span per task, when tracing is on (README "Tracing"); absent, nothing is asked. */
  tracer?: TaskTracer;
  /** Makes sure the delay queue of this TTL exists before a copy is sent to it (declared on first use). */
  declareDelayQueue?: (stepMs: number) => Promise<void>;
}

/** What a cancel found (DELETE /tasks/{id}, amqp-concurrency cancel). */
export type CancelResult =
  /** It was running: it got its AbortSignal, and the kill follows after its grace. */
  | 'running'
  /** It was waiting here: it ends `cancelled` without running. */
  | 'queued'
  /** Not here (yet): its id is remembered, and a delivery of it ends `cancelled` unrun. */
  | 'remembered';

export class Dispatcher {
  readonly #opts: DispatcherOptions;
  readonly #log: Logger;
  /** What keeps a redelivery of a message that runs or ran here from running again. */
  readonly #redeliveries: Redeliveries;
  /** Everything after the run: the outcome carried out, the ack, in flight and held bytes. */
  readonly #settlement: Settlement;
  /** The delivery being handled right now, synchronously: the suspect if the master dies. */
  #onStack: Delivery | undefined;
  /** Message ids an operator cancelled: a delivery of one ends `cancelled` unrun. */
  readonly #cancelledIds: RecentIds;
  #tracer: TaskTracer | undefined;

  constructor(opts: DispatcherOptions) {
    this.#opts = opts;
    this.#tracer = opts.tracer;
    this.#log = opts.logger.child({ component: 'dispatcher' });
    this.#redeliveries = new Redeliveries({
      consumer: opts.consumer,
      queue: opts.queue,
      renewAdopted: opts.renewAdopted === true,
      publish: (copy) => this.#settlement.publish(copy),
      fieldsOf: logFields,
      logger: this.#log,
      ...(opts.recentIdsCapacity === undefined ? {} : { recentIdsCapacity: opts.recentIdsCapacity }),
      ...(opts.recentIdsTtlMs === undefined ? {} : { recentIdsTtlMs: opts.recentIdsTtlMs }),
    });
    this.#settlement = new Settlement({
      pool: opts.pool,
      consumer: opts.consumer,
      publisher: opts.publisher,
      metrics: opts.metrics,
      logger: this.#log,
      queue: opts.queue,
      deadLetterQueue: opts.deadLetterQueue,
      retryPolicy: {
        queue: opts.queue,
        delaysMs: opts.retryDelaysMs,
        baseMs: opts.retryBaseMs ?? 1_000,
        maxMs: opts.retryMaxMs ?? 300_000,
      },
      redeliveries: this.#redeliveries,
      declareDelayQueue: opts.declareDelayQueue,
      heldBytesBudget: opts.heldBytesBudget,
      onPressure: opts.onPressure,
    });
    this.#cancelledIds = new RecentIds(
      opts.cancelledIdsCapacity ?? 10_000,
      opts.cancelledIdsTtlMs ?? 3 * 3_600_000,
    );
  }

  /** The messages running in a worker now (asked of the pool: no set of our own to keep on the per-task path). */
  #runningWorks(): Work[] {
    const works: Work[] = [];
    for (const request of this.#opts.pool.running()) {
      const work = request.owner as Work | undefined;
      if (work !== undefined && !work.finished) works.push(work);
    }
    return works;
  }

  /** Tracing is on from now (set once, at start-up, before the first delivery). */
  setTracer(tracer: TaskTracer): void {
    this.#tracer = tracer;
  }

  /** Messages received and not yet settled. */
  get inFlight(): number {
    return this.#settlement.inFlight;
  }

  /** The bytes of the bodies of the messages in flight. */
  get heldBytes(): number {
    return this.#settlement.heldBytes;
  }

  /** A moving average of body sizes (undefined before the first), for the prefetch's memory bound. */
  get averageBodyBytes(): number | undefined {
    return this.#settlement.averageBodyBytes;
  }

  /**
   * Takes one delivery. Whatever goes wrong in handling it ends that delivery alone (dead-
   * lettered as crashed, or given back): a throw here would otherwise reach amqplib's
   * frame loop, or stop the master, and with it every other message in flight.
   */
  handle(delivery: Delivery): void {
    this.#onStack = delivery;
    let work: Work | undefined;
    try {
      work = this.#accept(delivery);
      if (work !== undefined) this.#start(work);
    } catch (err) {
      this.#refuse(delivery, work, err);
    } finally {
      this.#onStack = undefined;
    }
  }

  /** The Work for a delivery, or undefined when it is taken care of without a run. */
  #accept(delivery: Delivery): Work | undefined {
    const { consumer, pool } = this.#opts;
    // Before the drain's give-back: a renewal copy of a running message is that message.
    if (this.#redeliveries.settleCopy(delivery)) return undefined;
    if (this.#settlement.draining) {
      consumer.requeue(delivery);
      return undefined;
    }
    const { message } = delivery;
    const rawId = message.properties.messageId;
    const messageId = typeof rawId === 'string' ? rawId : undefined;
    const attempt = attemptOf(message);
    const key = messageId === undefined ? undefined : dedupeKey(messageId, attempt, message.content.length);
    if (message.fields.redelivered && this.#redeliveries.settleRedelivery(delivery, key)) return undefined;
    const tracked = key !== undefined && !this.#redeliveries.isRunning(key);
    // Before anything else looks into the body: handling it is what killed the master.
    const deaths = message.fields.redelivered ? this.#deathsOf(messageId, message.content) : 0;
    const parsed =
      deaths === 0 ? parseTaskMessage(message.content, pool.funcs, this.#opts.maxMessageBytes) : undefined;
    const work: Work = {
      delivery,
      messageId,
      key,
      tracked,
      func: parsed === undefined ? UNKNOWN_FUNC : parsed.ok ? parsed.call.func : this.#labelOf(parsed.func),
      attempt,
      answered: false,
      finished: false,
      call: parsed?.ok ? parsed.call : undefined,
    };
    if (tracked) this.#redeliveries.track(key, work);
    this.#settlement.begin(work);
    // Whether it ends here unrun (cancelled), or waits first (delayed: no span of its own
    // for a hop through the delay queues), is known before its span begins.
    const cancelled =
      parsed?.ok === true &&
      messageId !== undefined &&
      this.#cancelledIds.size > 0 &&
      this.#cancelledIds.has(messageId);
    const headers = message.properties.headers;
    const delay =
      parsed?.ok === true && !cancelled && headers !== undefined ? delayOf(headers, Date.now()) : undefined;
    if (typeof delay === 'number') {
      this.#settlement.delay(work, delay);
      return undefined;
    }
    const tracer = this.#tracer;
    if (tracer !== undefined) this.#trace(tracer, work);
    if (parsed === undefined) {
      this.#log.error(
        { ...logFields(work), deaths },
        'the service stopped each time it handled this message: dead-lettering it as crashed',
      );
      this.#settlement.finish(work, {
        outcome: 'crashed',
        error: taskFailure.crashLoop(deaths),
        durationMs: 0,
      });
      this.#opts.crashJournal?.forget(crashKey(messageId, message.content));
      return undefined;
    }
    if (!parsed.ok) {
      this.#settlement.finish(work, { outcome: 'rejected', reason: parsed.reason });
      return undefined;
    }
    if (cancelled) {
      this.#settlement.finish(work, {
        outcome: 'cancelled',
        error: taskFailure.cancelled(false),
        durationMs: 0,
      });
      return undefined;
    }
    if (delay !== undefined) {
      this.#settlement.finish(work, { outcome: 'rejected', reason: delay });
      return undefined;
    }
    return work;
  }

  /** Its span begins: it is queued in the master. */
  #trace(tracer: TaskTracer, work: Work): void {
    const { message } = work.delivery;
    work.span = tracer.start({
      func: work.func,
      headers: message.properties.headers,
      queue: this.#opts.queue,
      exchange: message.fields.exchange,
      routingKey: message.fields.routingKey,
      messageId: work.messageId,
      attempt: work.attempt,
      bodyBytes: message.content.length,
    });
    work.span.event('queued');
  }

  /**
   * Cancels the message with this id (README "Cancel"): a run of it gets its AbortSignal
   * and then the kill after its grace; one waiting here ends without running; either way
   * it is dead-lettered as `cancelled`. Its id is remembered for a while in any case, so
   * that a later delivery of it (from the queue, a delay queue or a retry) ends unrun too.
   */
  cancel(messageId: string): CancelResult {
    this.#cancelledIds.add(messageId);
    // Asked of the pool by message id: every delivery of it, tracked here or not.
    const found = this.#opts.pool.cancel((request) => request.messageId === messageId);
    const result: CancelResult = found ?? 'remembered';
    this.#opts.metrics.cancels.inc({ result });
    this.#log.warn({ messageId, result }, 'task cancelled');
    return result;
  }

  #start(work: Work): void {
    const { consumer, pool } = this.#opts;
    const call = work.call as TaskCall;
    const { message } = work.delivery;
    const replyTo = message.properties.replyTo;
    const request: TaskRequest = {
      func: call.func,
      args: call.args,
      kwargs: call.kwargs,
      messageId: work.messageId,
      redelivered: message.fields.redelivered,
      attempt: work.attempt,
      wantResult: typeof replyTo === 'string' && replyTo !== '',
      // Asked before it starts: the latest delivery of the message (a redelivery may
      // have taken over) decides.
      abandoned: () => !consumer.isLive(work.delivery),
      owner: work,
    };
    const priority = message.properties.priority;
    if (typeof priority === 'number' && priority > 0) request.priority = priority;
    const span = work.span;
    if (span !== undefined) {
      request.traceparent = span.traceparent;
      if (span.tracestate !== undefined) request.tracestate = span.tracestate;
      request.onStart = () => span.event('started');
    }
    if (call.bigints) {
      // BigInt cannot cross the IPC's JSON: such arguments go as exact JSON text.
      request.exactJson = stringifyExact({ args: call.args, kwargs: call.kwargs });
      request.args = [];
      request.kwargs = undefined;
    }
    pool.submit(request, (ending) => this.#settlement.finish(work, ending));
  }

  /** How many times the master died handling this message, when that reaches the limit; else 0. */
  #deathsOf(messageId: string | undefined, body: Buffer): number {
    const journal = this.#opts.crashJournal;
    if (journal === undefined || journal.empty) return 0;
    const deaths = journal.deaths(crashKey(messageId, body));
    return deaths >= journal.limit ? deaths : 0;
  }

  /** Handling a delivery threw: end it alone, as crashed (dead-lettered), or give it back. */
  #refuse(delivery: Delivery, work: Work | undefined, err: unknown): void {
    const cause = serializeError(err);
    this.#log.error({ err, deliveryTag: delivery.message.fields.deliveryTag }, 'handling a delivery failed');
    if (work !== undefined) {
      this.#settlement.finish(work, {
        outcome: 'crashed',
        error: taskFailure.dispatch('handling the message failed', cause),
        durationMs: 0,
      });
      return;
    }
    try {
      this.#opts.consumer.requeue(delivery, true);
    } catch {
      // Its channel is going: the broker has it back.
    }
  }

  /**
   * The last resort, when the master is about to die of an error nobody caught: if a
   * delivery was being handled, write it down (synchronously) so that the crash loop it
   * may cause is broken (see crash-journal.ts).
   */
  recordCrash(): void {
    const journal = this.#opts.crashJournal;
    if (journal === undefined) return;
    const keyOf = ({ message }: Delivery) => {
      const id = message.properties.messageId;
      return crashKey(typeof id === 'string' ? id : undefined, message.content);
    };
    // The delivery on the stack is the culprit. With none (the error came from a worker's
    // frame, a timer, a result), every delivery running in a worker is a suspect: an
    // innocent one needs as many deaths as the limit in a row to be dead-lettered.
    if (this.#onStack !== undefined) journal.suspect(keyOf(this.#onStack));
    else journal.suspect(...this.#runningWorks().map((work) => keyOf(work.delivery)));
  }

  /**
   * From now on deliveries go straight back to the queue; resolves when all in flight are
   * settled. Messages held after failing to settle go back now: the drain does not wait
   * for them.
   */
  drain(): Promise<void> {
    return this.#settlement.drain();
  }

  /** A func name for metrics: only the module's own, so that label sets stay bounded. */
  #labelOf(func: string | undefined): string {
    return func !== undefined && this.#opts.pool.funcs.has(func) ? func : UNKNOWN_FUNC;
  }

  /**
   * A consuming session ended: its uncertain acks and its id-less running messages are
   * remembered, so that their redeliveries are not run again (redeliveries.ts).
   */
  sessionLost(lost: LostSession): void {
    this.#redeliveries.sessionLost(lost, this.#runningWorks());
  }
}
