// The redelivery memory: what keeps a message that the broker gives again, while it still
// runs here or after it finished with its ack uncertain, from running a second time
// (README "Delivery guarantees"; docs/architecture.md, "adopt" and "renew"). It owns four
// memories, each consulted only for a redelivery or one of our own copies, never on the
// first delivery's path:
//
// - the running messages by dedupe key (message id, attempt, body length);
// - finished messages whose ack is not proven to have reached the broker;
// - running messages without an id whose session died ("orphans"), by body digest;
// - the renewal copies it made, by token.
//
// The dispatcher asks it about each redelivery and tells it what it tracks, settles and
// loses; it never runs or settles a message itself, except a redelivery or copy it
// recognises (acked unrun, or adopted by the run under way).
import type { ConsumeMessage } from 'amqplib';
import type { Logger } from 'pino';
import type { AmqpConsumer } from '../amqp/consumer.ts';
import type { Delivery, LostSession } from '../amqp/delivery.ts';
import { ADOPTED_COPY_HEADER, adoptedCopy, ownHeader, type Publication } from './outcome.ts';
import { RecentIds } from './recent-ids.ts';
import { bodyKey, finishedKey, finishedMemo, type Renewal, type Work } from './work.ts';

/** Renewal copies this service has made and not yet seen: the run waiting for one, or `settled` when the run is over. */
const MAX_COPIES_REMEMBERED = 10_000;

export interface RedeliveriesOptions {
  consumer: Pick<AmqpConsumer, 'ack' | 'isLive'>;
  /** The work queue, where a renewal copy goes. */
  queue: string;
  /** Renew adopted redeliveries (a quorum queue with a delivery limit; see #renew). */
  renewAdopted: boolean;
  /** A confirmed, mandatory publish (the dispatcher's, with its metrics and logs). */
  publish: (copy: Publication) => Promise<{ status: 'ok' | 'refused' | 'failed'; reason: string }>;
  /** The log fields of a message being worked on. */
  fieldsOf: (work: Work) => Record<string, unknown>;
  logger: Logger;
  /** How many finished-but-unacked deliveries to remember (default 10,000). */
  recentIdsCapacity?: number;
  /** How long to remember one (default 5 minutes; see dedupeKey). */
  recentIdsTtlMs?: number;
}

export class Redeliveries {
  readonly #opts: RedeliveriesOptions;
  readonly #log: Logger;
  /** The messages running here, by dedupe key (only the run recorded first: see Work.tracked). */
  readonly #running = new Map<string, Work>();
  /** Finished messages whose ack is not proven to have reached the broker. */
  readonly #finishedUnacked: RecentIds;
  /** Running messages without an id whose session died, by body digest, waiting for their redelivery. */
  readonly #orphans = new Map<string, Work[]>();
  /** Renewal copies in the queue, by token (see #renew). */
  readonly #copies = new Map<string, Work | 'settled'>();
  /** Makes renewal tokens unique to this process. */
  readonly #tokenPrefix = `${process.pid}.${Date.now().toString(36)}.`;
  #tokens = 0;

  constructor(opts: RedeliveriesOptions) {
    this.#opts = opts;
    this.#log = opts.logger;
    this.#finishedUnacked = new RecentIds(
      opts.recentIdsCapacity ?? 10_000,
      opts.recentIdsTtlMs ?? 5 * 60_000,
    );
  }

  /** Whether a message with this dedupe key runs here now. */
  isRunning(key: string): boolean {
    return this.#running.has(key);
  }

  /** This run is the one recorded under its key (Work.tracked). */
  track(key: string, work: Work): void {
    this.#running.set(key, work);
  }

  /** The message is settled: no longer running here. */
  untrack(work: Work): void {
    if (work.tracked && work.key !== undefined) this.#running.delete(work.key);
  }

  /** It finished but its ack could not be given (its session ended): a redelivery of it is acked unrun. */
  finishedUnacked(message: ConsumeMessage): void {
    this.#finishedUnacked.add(finishedKey(finishedMemo(message)));
  }

  /** Its renewal copy was made redundant by a give-back: the copy is the message given back. */
  forgetCopy(token: string): void {
    this.#copies.delete(token);
  }

  /**
   * True when this delivery is one of our renewal copies, taken care of here (adopted by
   * its run, or acked unrun). Asked before anything else, the drain's give-back included:
   * a renewal copy of a running message is that message.
   */
  settleCopy(delivery: Delivery): boolean {
    return this.#copies.size > 0 && this.#copyOf(delivery);
  }

  /**
   * A redelivery (`redelivered` set): true when it is taken care of without running it
   * again, by its dedupe key when it has a message id, else by its body.
   */
  settleRedelivery(delivery: Delivery, key: string | undefined): boolean {
    if (key !== undefined) return this.#settleDuplicate(delivery, key);
    return (this.#orphans.size > 0 || this.#finishedUnacked.size > 0) && this.#settleByBody(delivery);
  }

  /** True when this redelivery is taken care of without running it again. */
  #settleDuplicate(delivery: Delivery, key: string): boolean {
    const { consumer } = this.#opts;
    const fields = {
      messageId: delivery.message.properties.messageId,
      deliveryTag: delivery.message.fields.deliveryTag,
    };
    // The running set first: a run in progress is the truth, a memory only a record.
    const running = this.#running.get(key);
    if (running !== undefined && !consumer.isLive(running.delivery)) {
      running.delivery = delivery;
      running.renewal = undefined;
      this.#log.info(fields, 'redelivery of a message still running: it will be settled when the run ends');
      this.#renew(running);
      return true;
    }
    if (running === undefined && this.#finishedUnacked.take(key)) {
      consumer.ack(delivery);
      this.#log.info(fields, 'redelivery of a message that already finished: acked, not run again');
      return true;
    }
    return false;
  }

  /**
   * A redelivery without a message id, matched by its body against what the dead
   * session had outstanding: still running here, it is adopted (the run settles it);
   * finished with its ack uncertain, it is acked without running again.
   */
  #settleByBody(delivery: Delivery): boolean {
    const key = bodyKey(delivery.message.content);
    const fields = { deliveryTag: delivery.message.fields.deliveryTag };
    const orphans = this.#orphans.get(key);
    const orphan = orphans?.shift();
    if (orphan !== undefined) {
      if (orphans?.length === 0) this.#orphans.delete(key);
      orphan.orphanKey = undefined;
      orphan.delivery = delivery;
      orphan.renewal = undefined;
      this.#log.info(
        fields,
        'redelivery (matched by body) of a message still running: it will be settled when the run ends',
      );
      this.#renew(orphan);
      return true;
    }
    if (this.#finishedUnacked.take(key)) {
      this.#opts.consumer.ack(delivery);
      this.#log.info(
        fields,
        'redelivery (matched by body) of a message that already finished: acked, not run again',
      );
      return true;
    }
    return false;
  }

  /**
   * An adopted redelivery on a quorum queue with a delivery limit is renewed: a copy of it
   * goes back into the queue (confirmed), then the redelivery is acked. The broker counted
   * each return of it towards the delivery limit, though none was the message's fault: a
   * broker that cannot be given a consumer timeout (3.10, 3.11) closes the channel again
   * and again while the task runs, and would at last dead-letter a message that succeeds
   * here (two outcomes). The copy starts with a fresh count; its token (a header) tells
   * this service it is the running one, so it is adopted, or acked unrun once the run is
   * over. Nothing is lost meanwhile: the copy is in the queue before the redelivery is
   * acked. A copy that reaches another replica, or this one after a restart, runs (once
   * more, as any redelivery would); a failed publish leaves things as they were.
   */
  #renew(work: Work): void {
    if (this.#opts.renewAdopted !== true || work.finished || work.renewal !== undefined) return;
    const adopted = work.delivery;
    const renewal: Renewal = { token: `${this.#tokenPrefix}${++this.#tokens}`, adopted, acked: false };
    work.renewal = renewal;
    work.tokens = [...(work.tokens ?? []), renewal.token];
    this.#remember(renewal.token, work);
    const copy = adoptedCopy(adopted.message, this.#opts.queue, renewal.token);
    void this.#opts.publish(copy).then(({ status, reason }) => {
      const { consumer } = this.#opts;
      if (work.delivery !== adopted) {
        // Something took over from the adopted redelivery (its copy, or a later
        // redelivery): it is done with, whatever became of the publish.
        consumer.ack(adopted);
      } else if (status === 'ok' && !work.answered && consumer.ack(adopted)) {
        renewal.acked = true;
        this.#log.info(
          this.#opts.fieldsOf(work),
          'adopted redelivery renewed: a copy with a fresh delivery count is in the queue',
        );
      } else if (status !== 'ok') {
        // The copy may still have reached the queue: if it comes, it is acked unrun (see #copyOf).
        this.#log.warn(
          { ...this.#opts.fieldsOf(work), reason },
          'renewing an adopted redelivery failed; holding it',
        );
      }
      if (work.renewal === renewal && !renewal.acked) work.renewal = undefined;
    });
  }

  #remember(token: string, entry: Work | 'settled'): void {
    this.#copies.set(token, entry);
    if (this.#copies.size <= MAX_COPIES_REMEMBERED) return;
    // Forget the oldest copy already settled; a running message's tokens are kept.
    for (const [old, value] of this.#copies) {
      if (value === 'settled') {
        this.#copies.delete(old);
        return;
      }
    }
  }

  /**
   * True when this delivery is one of our renewal copies, taken care of without running
   * it: it becomes the delivery of its running message when that one's delivery is the
   * renewed redelivery or has died with its session; else (the run is over, or holds
   * another live delivery) it is acked unrun.
   */
  #copyOf(delivery: Delivery): boolean {
    const token = ownHeader(delivery.message.properties.headers, ADOPTED_COPY_HEADER);
    if (typeof token !== 'string') return false;
    const entry = this.#copies.get(token);
    if (entry === undefined) return false;
    const { consumer } = this.#opts;
    const fields = {
      deliveryTag: delivery.message.fields.deliveryTag,
      messageId: delivery.message.properties.messageId,
    };
    const takesOver =
      entry !== 'settled' &&
      !entry.answered &&
      (!consumer.isLive(entry.delivery) ||
        (entry.renewal?.token === token && entry.delivery === entry.renewal.adopted));
    if (entry === 'settled' || !takesOver) {
      consumer.ack(delivery);
      this.#log.info(fields, 'renewal copy of a message already settled or held: acked, not run again');
      return true;
    }
    entry.delivery = delivery;
    entry.renewal = undefined;
    this.unorphan(entry);
    this.#log.info(fields, 'renewal copy of a message still running: it will be settled when the run ends');
    return true;
  }

  /** Settled: a renewal copy of it that comes later is acked unrun. */
  settleTokens(work: Work): void {
    for (const token of work.tokens ?? []) this.#remember(token, 'settled');
  }

  /** No longer waiting to be matched by body. */
  unorphan(work: Work): void {
    if (work.orphanKey === undefined) return;
    const list = this.#orphans.get(work.orphanKey);
    const at = list?.indexOf(work) ?? -1;
    if (list !== undefined && at !== -1) list.splice(at, 1);
    if (list?.length === 0) this.#orphans.delete(work.orphanKey);
    work.orphanKey = undefined;
  }

  /**
   * A consuming session ended. Acks it took that no fence confirmed are uncertain: their
   * messages are remembered as finished, so a redelivery is acked unrun. Messages it
   * delivered that still run, without a message id, wait to be matched by body.
   */
  sessionLost(lost: LostSession, running: Iterable<Work>): void {
    for (const memo of lost.uncertain) this.#finishedUnacked.add(finishedKey(memo));
    for (const work of running) {
      if (
        work.delivery.session !== lost.session ||
        work.messageId !== undefined ||
        work.orphanKey !== undefined
      )
        continue;
      const key = bodyKey(work.delivery.message.content);
      work.orphanKey = key;
      const list = this.#orphans.get(key);
      if (list === undefined) this.#orphans.set(key, [work]);
      else list.push(work);
    }
    if (lost.uncertain.length > 0)
      this.#log.info(
        { uncertain: lost.uncertain.length },
        'acks not proven to have reached the broker: their redeliveries will be acked unrun',
      );
  }
}
