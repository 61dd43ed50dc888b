// From delivery to settlement: validate the body, run it in the pool, then carry out the
// outcome plan — reply, dead-letter or retry copy confirmed by the broker, and only then
// the ack. One bad message never stops or slows the others: each delivery is settled on
// its own. Across a reconnect, a message that comes back while it still runs, or after
// it finished but before its ack reached the broker, is not run a second time; what its
// dead channel delivered and had not started is dropped (the broker has it again).
//
// Every delivery is settled exactly once: whatever a task throws and whatever fails in
// settling it ends in an ack after a dead letter, or in a requeue.
//
// Speed: this is the master's per-task path. A task with nothing to publish (no reply_to,
// succeeded) is settled synchronously when the pool's promise resolves: no async chain, no
// log fields built for a level that is off (see also task-metrics.ts).
import type { Logger } from 'pino';
import type { AmqpConsumer, Delivery, LostSession } from '../amqp/consumer.ts';
import { delayQueueName, delayStep } from '../amqp/delay.ts';
import type { AmqpPublisher } from '../amqp/publisher.ts';
import { PublishRefusedError, serializeError, taskFailure, UnroutableError } from '../errors.ts';
import { stringifyExact } from '../ipc/exact-json.ts';
import { type Metrics, UNKNOWN_FUNC } from '../metrics/metrics.ts';
import type { Pool, TaskRequest } from '../pool/pool.ts';
import type { TaskTracer } from '../telemetry/task-tracer.ts';
import { type CrashJournal, crashKey } from './crash-journal.ts';
import { delayOf } from './delay-header.ts';
import { HeldBytes } from './held-bytes.ts';
import {
  attemptOf,
  cleanedCopy,
  delayedCopy,
  type Ending,
  errorOf,
  type Outcome,
  type OutcomePlan,
  type Publication,
  planOutcome,
  refusedReply,
} from './outcome.ts';
import { RecentIds } from './recent-ids.ts';
import { Redeliveries } from './redeliveries.ts';
import { type RetryPolicy, retryRoute } from './retry-route.ts';
import { parseTaskMessage, type TaskCall } from './task-message.ts';
import { dedupeKey, isRenewed, type Work } from './work.ts';

/** How a publish ended: confirmed, refused for good (see PublishRefusedError), or failed for now. */
type PublishResult = 'ok' | 'refused' | 'failed';

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

/** Whether giving the message back counts towards a quorum queue's delivery limit (basic.reject). */
function countsAgainst(outcome: Outcome | undefined): boolean {
  return outcome === 'failed' || outcome === 'timeout' || outcome === 'crashed';
}

export class Dispatcher {
  readonly #opts: DispatcherOptions;
  readonly #log: Logger;
  /** Deliveries received and not yet settled. */
  #inFlight = 0;
  readonly #heldBytes: HeldBytes;
  #drained: (() => void) | undefined;
  /** What keeps a redelivery of a message that runs or ran here from running again. */
  readonly #redeliveries: Redeliveries;
  #draining = false;
  /** How often each message (by digest) failed to settle in this process; bounded. */
  readonly #settleFailures = new Map<string, number>();
  /** Messages held back after repeated settle failures: each gives itself back when called. */
  readonly #held = new Set<() => void>();
  /** The delivery being handled right now, synchronously: the suspect if the master dies. */
  #onStack: Delivery | undefined;
  /** Message ids an operator cancelled: a delivery of one ends `cancelled` unrun. */
  readonly #cancelledIds: RecentIds;
  #tracer: TaskTracer | undefined;
  readonly #retryPolicy: RetryPolicy;

  constructor(opts: DispatcherOptions) {
    this.#opts = opts;
    this.#tracer = opts.tracer;
    this.#retryPolicy = {
      queue: opts.queue,
      delaysMs: opts.retryDelaysMs,
      baseMs: opts.retryBaseMs ?? 1_000,
      maxMs: opts.retryMaxMs ?? 300_000,
    };
    this.#log = opts.logger.child({ component: 'dispatcher' });
    this.#redeliveries = new Redeliveries({
      consumer: opts.consumer,
      queue: opts.queue,
      renewAdopted: opts.renewAdopted === true,
      publish: (copy) => this.#publish(copy),
      fieldsOf: (work) => this.#fields(work),
      logger: this.#log,
      ...(opts.recentIdsCapacity === undefined ? {} : { recentIdsCapacity: opts.recentIdsCapacity }),
      ...(opts.recentIdsTtlMs === undefined ? {} : { recentIdsTtlMs: opts.recentIdsTtlMs }),
    });
    this.#cancelledIds = new RecentIds(
      opts.cancelledIdsCapacity ?? 10_000,
      opts.cancelledIdsTtlMs ?? 3 * 3_600_000,
    );
    this.#heldBytes = new HeldBytes({
      budget: opts.heldBytesBudget,
      ...(opts.onPressure === undefined ? {} : { onPressure: opts.onPressure }),
      logger: this.#log,
    });
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

  /** Nothing in flight: the held-bytes budget collects garbage then, after a burst. */
  readonly #idle = (): boolean => this.#inFlight === 0;

  /** Tracing is on from now (set once, at start-up, before the first delivery). */
  setTracer(tracer: TaskTracer): void {
    this.#tracer = tracer;
  }

  /** Messages received and not yet settled. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** The bytes of the bodies of the messages in flight. */
  get heldBytes(): number {
    return this.#heldBytes.held;
  }

  /** A moving average of body sizes (undefined before the first), for the prefetch's memory bound. */
  get averageBodyBytes(): number | undefined {
    return this.#heldBytes.averageBody;
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
    if (this.#draining) {
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
    this.#inFlight++;
    this.#heldBytes.take(message.content.length);
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
      this.#delay(work, delay);
      return undefined;
    }
    const tracer = this.#tracer;
    if (tracer !== undefined) this.#trace(tracer, work);
    if (parsed === undefined) {
      this.#log.error(
        { ...this.#fields(work), deaths },
        'the service stopped each time it handled this message: dead-lettering it as crashed',
      );
      this.#finish(work, {
        outcome: 'crashed',
        error: taskFailure.crashLoop(deaths),
        durationMs: 0,
      });
      this.#opts.crashJournal?.forget(crashKey(messageId, message.content));
      return undefined;
    }
    if (!parsed.ok) {
      this.#finish(work, { outcome: 'rejected', reason: parsed.reason });
      return undefined;
    }
    if (cancelled) {
      this.#finish(work, { outcome: 'cancelled', error: taskFailure.cancelled(false), durationMs: 0 });
      return undefined;
    }
    if (delay !== undefined) {
      this.#finish(work, { outcome: 'rejected', reason: delay });
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

  /**
   * A message that may not run yet goes to wait in a delay queue (amqp/delay.ts): its
   * copy is confirmed there before it is acked here, and it is never held meanwhile.
   */
  #delay(work: Work, until: number): void {
    work.finished = true;
    const step = delayStep(until - Date.now());
    const copy = delayedCopy(work.delivery.message, delayQueueName(this.#opts.queue, step), until);
    void this.#declareStep(step)
      .then(() => this.#publish(copy))
      .then(({ status, reason }) => {
        if (status === 'refused') {
          // The broker can never take this copy (its headers, its size): it cannot wait,
          // so it ends now, dead-lettered (as a cleaned copy if need be) with the reason.
          work.finished = false;
          this.#finish(work, { outcome: 'rejected', reason: `it cannot wait in a delay queue: ${reason}` });
          return;
        }
        if (status !== 'ok') {
          this.#log.error(
            this.#fields(work),
            'the delayed copy was not confirmed; message given back to the queue',
          );
          this.#giveBackAfterFailure(work, false);
          return;
        }
        work.answered = true;
        if (!this.#opts.consumer.ack(work.delivery))
          this.#redeliveries.finishedUnacked(work.delivery.message);
        this.#opts.metrics.delayed.inc({ func: work.func });
        if (this.#log.isLevelEnabled('debug'))
          this.#log.debug(
            { ...this.#fields(work), runsInMs: until - Date.now(), stepMs: step },
            'task delayed',
          );
        this.#settled(work);
      });
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
    pool.run(request).then((ending) => this.#finish(work, ending));
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
      this.#finish(work, {
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

  /** From now on deliveries go straight back to the queue; resolves when all in flight are settled. */
  drain(): Promise<void> {
    this.#draining = true;
    // Messages held after failing to settle go back now: the drain does not wait for them.
    for (const giveBack of [...this.#held]) giveBack();
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const previous = this.#drained;
      this.#drained = () => {
        previous?.();
        resolve();
      };
    });
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

  /** The run is over: carry out the plan; synchronously when there is nothing to publish. */
  #finish(work: Work, ending: Ending): void {
    if (work.finished) return;
    work.finished = true;
    this.#redeliveries.unorphan(work);
    try {
      const { message } = work.delivery;
      const retry = retryRoute(
        work.attempt,
        this.#opts.pool.limits[work.func],
        this.#retryPolicy,
        Date.now(),
      );
      work.retry = retry;
      const plan = planOutcome(message, ending, {
        deadLetterQueue: this.#opts.deadLetterQueue,
        attempt: work.attempt,
        retryQueue: retry?.queue,
        ...(retry?.until === undefined ? {} : { retryDelayUntil: retry.until }),
        ...(work.span === undefined ? {} : { traceparent: work.span.traceparent }),
      });
      if (work.span !== undefined) work.ended = { outcome: plan.outcome, error: errorOf(ending)?.message };
      if (plan.outcome === undefined && ending.outcome === 'returned' && ending.delayMs !== undefined) {
        // Held back by its function's limit too long to stay unacked: back through a delay queue.
        this.#log.info(
          { ...this.#fields(work), reason: ending.reason },
          'message sent to wait in a delay queue',
        );
        this.#delay(work, Date.now() + ending.delayMs);
        return;
      }
      if (plan.outcome === undefined) {
        // Given back unfinished (a drain, a shrinking window): not the message's fault.
        this.#requeue(work, false);
        if (this.#log.isLevelEnabled('info')) {
          const reason = ending.outcome === 'returned' ? ending.reason : undefined;
          this.#log.info({ ...this.#fields(work), reason }, 'message given back to the queue');
        }
        this.#settled(work);
        return;
      }
      if (plan.reply === undefined && plan.deadLetter === undefined) {
        this.#ack(work, plan, ending);
        this.#settled(work);
        return;
      }
      // It settles the work itself: a give-back after a failed copy may be held a while.
      this.#publishThenAck(work, plan, ending).catch((err) => this.#failed(work, ending, err));
    } catch (err) {
      this.#failed(work, ending, err);
    }
  }

  /** The delay queue exists (declared on first use; a failed declaration shows as an unroutable copy). */
  async #declareStep(stepMs: number): Promise<void> {
    await this.#opts.declareDelayQueue?.(stepMs).catch((err: unknown) => {
      this.#log.warn({ err, stepMs }, 'declaring a delay queue failed');
    });
  }

  async #publishThenAck(work: Work, plan: OutcomePlan, ending: Ending): Promise<void> {
    const step = work.retry?.step;
    if (plan.retry && step !== undefined) await this.#declareStep(step);
    const [replied, copied] = await Promise.all([
      this.#publishOrReplace(
        work,
        plan.reply,
        refusedReply,
        'the reply was refused; replying with the error',
      ),
      this.#publishOrReplace(
        work,
        plan.deadLetter,
        cleanedCopy,
        'the dead-letter copy cannot be published as it is: publishing a cleaned copy',
      ),
    ]);
    if (plan.reply !== undefined && replied !== 'ok') {
      this.#log.error(
        { ...this.#fields(work), replyTo: plan.reply.routingKey },
        'the reply could not be published',
      );
    }
    if (plan.deadLetter !== undefined) {
      if (copied !== 'ok') {
        // Not confirmed, so not acked: the message goes back rather than being lost.
        // Counted towards a quorum queue's delivery limit when the run was at fault.
        this.#log.error(
          this.#fields(work),
          'the dead-letter or retry copy was not confirmed; message given back to the queue',
        );
        this.#giveBackAfterFailure(work, countsAgainst(plan.outcome));
        return;
      }
      if (!plan.retry) this.#opts.metrics.deadLettered.inc({ reason: plan.outcome as Outcome });
    }
    this.#ack(work, plan, ending);
    this.#settled(work);
  }

  /**
   * Publishes `publication`; one the broker can never take is replaced by what
   * `replacement` makes of it (a cleaned dead-letter copy, a short error reply), so that
   * the message still ends. Nothing to publish is a success.
   */
  async #publishOrReplace(
    work: Work,
    publication: Publication | undefined,
    replacement: (refused: Publication, reason: string) => Publication,
    saying: string,
  ): Promise<PublishResult> {
    const result = await this.#publish(publication);
    if (result.status !== 'refused' || publication === undefined) return result.status;
    this.#log.error({ ...this.#fields(work), reason: result.reason }, saying);
    return (await this.#publish(replacement(publication, result.reason))).status;
  }

  /** Acks (the latest delivery of the message), counts and logs the outcome. */
  #ack(work: Work, plan: OutcomePlan, ending: Ending): void {
    const outcome = plan.outcome as Outcome;
    // The delivery may have been replaced by a redelivery that arrived meanwhile: settle that one.
    work.answered = true;
    const renewed = isRenewed(work);
    this.#redeliveries.settleTokens(work);
    // Acked already when renewed: its copy is acked when it comes.
    if (!renewed && !this.#opts.consumer.ack(work.delivery))
      // Its session has ended: the broker gives it again, and that must be acked unrun.
      this.#redeliveries.finishedUnacked(work.delivery.message);
    const durationMs = 'durationMs' in ending ? ending.durationMs : 0;
    this.#opts.metrics.tasks.record(work.func, outcome, durationMs / 1000);
    if (outcome === 'succeeded') {
      if (this.#log.isLevelEnabled('info'))
        this.#log.info(
          { ...this.#fields(work), outcome, durationMs: Math.round(durationMs * 1000) / 1000 },
          'task succeeded',
        );
      return;
    }
    if (!this.#log.isLevelEnabled('warn')) return;
    const fields = { ...this.#fields(work), outcome, durationMs: Math.round(durationMs * 1000) / 1000 };
    const error = errorOf(ending)?.message;
    if (plan.retry) {
      const retryInMs = work.retry?.delayMs;
      this.#log.warn({ ...fields, error, retryInMs }, `task ${outcome}; retrying`);
    } else this.#log.warn({ ...fields, error }, `task ${outcome}`);
  }

  #fields(work: Work) {
    const { fields } = work.delivery.message;
    const base = {
      func: work.func,
      messageId: work.messageId,
      deliveryTag: fields.deliveryTag,
      redelivered: fields.redelivered,
      attempt: work.attempt,
    };
    const span = work.span;
    return span === undefined ? base : { ...base, trace_id: span.traceId, span_id: span.spanId };
  }

  /**
   * Settling failed (a bug of ours, or a value nothing expected): the delivery must still
   * end, in a requeue, counted towards a quorum queue's delivery limit so that a message
   * that always fails here ends in the broker's dead-letter queue rather than loop.
   */
  #failed(work: Work, ending: Ending, err: unknown): void {
    this.#log.error({ err, ...this.#fields(work) }, 'settling a delivery failed; giving it back');
    // Never a second answer for one delivery: the broker closes the channel on that.
    if (work.answered) this.#settled(work);
    else this.#giveBackAfterFailure(work, ending.outcome !== 'returned');
  }

  /**
   * Gives back a message whose settling failed, and ends it here. The same message failing
   * to settle again and again in this process (a bug of ours, a broker that refuses
   * something of it) must not become a hot loop of redeliveries: from its third failure on
   * it is held for a growing while (the delivery stays unacked) before it goes back.
   */
  #giveBackAfterFailure(work: Work, counted: boolean): void {
    const { message } = work.delivery;
    const key = crashKey(work.messageId, message.content);
    const failures = (this.#settleFailures.get(key) ?? 0) + 1;
    this.#settleFailures.delete(key);
    this.#settleFailures.set(key, failures);
    if (this.#settleFailures.size > 10_000)
      this.#settleFailures.delete(this.#settleFailures.keys().next().value as string);
    let timer: NodeJS.Timeout | undefined;
    const giveBack = () => {
      this.#held.delete(giveBack);
      clearTimeout(timer);
      try {
        if (!work.answered) this.#requeue(work, counted);
      } catch (err) {
        this.#log.error(
          { err },
          'giving a delivery back failed; the broker redelivers it when its channel ends',
        );
      }
      this.#settled(work);
    };
    if (failures < 3 || this.#draining) {
      giveBack();
      return;
    }
    const delayMs = Math.min(30_000, 1_000 * 2 ** (failures - 3));
    this.#log.warn(
      { ...this.#fields(work), failures, delayMs },
      'this message keeps failing to settle: holding it before it goes back',
    );
    timer = setTimeout(giveBack, delayMs);
    this.#held.add(giveBack);
  }

  #requeue(work: Work, counted: boolean): void {
    work.answered = true;
    const renewal = work.renewal;
    if (renewal?.acked === true && work.delivery === renewal.adopted) {
      // Acked already; its renewal copy is in the queue and runs as the message given
      // back (with a fresh count: a counted give-back is not counted here).
      this.#redeliveries.forgetCopy(renewal.token);
      return;
    }
    this.#redeliveries.settleTokens(work);
    this.#opts.consumer.requeue(work.delivery, counted);
  }

  /** Done with this delivery, however it ended. */
  #settled(work: Work): void {
    const span = work.span;
    if (span !== undefined) {
      span.event('settled');
      span.end(work.ended?.outcome, work.ended?.error);
    }
    this.#redeliveries.untrack(work);
    this.#inFlight--;
    this.#heldBytes.release(work.delivery.message.content.length, this.#idle);
    if (this.#inFlight === 0 && this.#drained !== undefined) {
      const drained = this.#drained;
      this.#drained = undefined;
      drained();
    }
  }

  async #publish(publication: Publication | undefined): Promise<{ status: PublishResult; reason: string }> {
    if (publication === undefined) return { status: 'ok', reason: '' };
    try {
      await this.#opts.publisher.publish(
        publication.exchange,
        publication.routingKey,
        publication.content,
        publication.options,
      );
      return { status: 'ok', reason: '' };
    } catch (err) {
      const refused = err instanceof PublishRefusedError;
      this.#opts.metrics.publishFailures.inc({
        reason: refused ? 'refused' : err instanceof UnroutableError ? 'unroutable' : 'unconfirmed',
      });
      this.#log.error({ err }, 'publish failed');
      return { status: refused ? 'refused' : 'failed', reason: (err as Error).message };
    }
  }
}
