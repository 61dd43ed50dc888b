// The morning after (README "Dead letters"): list, replay and purge what is in
// `<queue>.dead`, for the CLI (`amqp-concurrency dead`) and the HTTP routes (`/dead`).
//
// One pass reads at most the messages that were in the queue when it began (basic.get,
// one at a time), so a dead letter that dies again during a replay, or one that arrives
// meanwhile, is never read twice. A message that is not acted on stays unacked until the
// pass ends and then goes back as it was, in its place, when the channel closes: a pass
// holds nothing but the one message in hand, whatever the queue's length, and a pass
// killed midway loses nothing. A replayed copy is confirmed by the broker before its dead
// letter is acked, so a message is always in the dead-letter queue or in the work queue
// (in both only if the pass dies between the confirm and the ack).
import { createHash } from 'node:crypto';
import type { Channel, ConfirmChannel, GetMessage, Options } from 'amqplib';
import type { BrokerConnection } from './connection.ts';
import { type DeadFilter, matches } from './dead-filter.ts';
import type { ReplayJournal } from './replay-journal.ts';

export type DeadAction = 'list' | 'replay' | 'purge';

/** One dead letter as a listing shows it: never the body unless asked for. */
export interface DeadLetter {
  messageId: string | undefined;
  func: string | undefined;
  kind: string | undefined;
  error: string | undefined;
  attempts: number | undefined;
  /** When it died (ms since the epoch): `x-died-at`, else the publish timestamp, else unknown. */
  diedAt: number | undefined;
  routingKey: string;
  replayed: number;
  body?: string;
}

export interface DeadSummary {
  /** Dead letters read in this pass. */
  seen: number;
  /** Those that matched the filter (and the limit). */
  matched: number;
  /** Replayed or purged (0 for a list or a dry run). */
  acted: number;
  /** Matched, but the replay's copy was not confirmed: left in the dead-letter queue. */
  failed: number;
  /**
   * Dead letters still here whose copy a previous replay, stopped midway, had sent: they
   * may be in the work queue too (their ids, or "-").
   */
  possibleDuplicates: string[];
}

/** What identifies one dead letter across passes: its body, id and death time, as a digest. */
function deadLetterKey(m: GetMessage): string {
  const died = own(m.properties.headers, 'x-died-at');
  return createHash('sha256')
    .update(String(m.properties.messageId ?? ''))
    .update('\u0000')
    .update(String(died ?? ''))
    .update('\u0000')
    .update(m.content)
    .digest('hex')
    .slice(0, 32);
}

export interface DeadPass {
  action: DeadAction;
  deadLetterQueue: string;
  /** Where a replay sends copies: the work exchange. */
  exchange: string;
  /** The work queue, where a copy the work exchange cannot route goes straight. */
  workQueue: string;
  filter: DeadFilter;
  /** Replay or purge nothing; say what would be done. */
  dryRun?: boolean;
  /** Put the body (as text) in each listed dead letter. */
  showBody?: boolean;
  /** Each matching dead letter, as it is handled. */
  onMatch: (letter: DeadLetter) => void;
  /** Where a replay writes down what it sends (possible duplicates if it is stopped midway). */
  journal?: ReplayJournal;
  now?: number;
}

/** The headers a dead letter gained in dying; a replayed copy starts without them. */
const DEATH_HEADERS = [
  'x-error-kind',
  'x-error-message',
  'x-attempts',
  'x-died-at',
  'x-delay-until',
  'x-death',
  'x-first-death-exchange',
  'x-first-death-queue',
  'x-first-death-reason',
  'x-last-death-exchange',
  'x-last-death-queue',
  'x-last-death-reason',
  'x-headers-dropped',
  'x-adopted-copy',
];

const own = (headers: Record<string, unknown> | undefined, name: string): unknown =>
  headers !== undefined && Object.hasOwn(headers, name) ? headers[name] : undefined;

/** The func named in a body, without trusting the body: undefined when it is not a task. */
function funcOf(content: Buffer): string | undefined {
  if (content.length > 1024 * 1024) return undefined;
  try {
    const func = (JSON.parse(content.toString('utf8')) as { func?: unknown } | null)?.func;
    return typeof func === 'string' ? func : undefined;
  } catch {
    return undefined;
  }
}

/** The routing key the broker recorded when it dead-lettered the message itself (x-death). */
function deathRoutingKey(headers: Record<string, unknown> | undefined): string | undefined {
  const deaths = own(headers, 'x-death');
  if (!Array.isArray(deaths)) return undefined;
  const keys = (deaths.at(-1) as { 'routing-keys'?: unknown } | undefined)?.['routing-keys'];
  return Array.isArray(keys) && typeof keys[0] === 'string' ? keys[0] : undefined;
}

export function describeDeadLetter(m: GetMessage, showBody: boolean): DeadLetter {
  const { headers, messageId, timestamp } = m.properties;
  const num = (value: unknown) => (typeof value === 'number' && Number.isFinite(value) ? value : undefined);
  const str = (value: unknown) => (typeof value === 'string' ? value : undefined);
  const diedAt =
    num(own(headers, 'x-died-at')) ??
    (num(timestamp) === undefined ? undefined : (timestamp as number) * 1000);
  const letter: DeadLetter = {
    messageId: str(messageId),
    func: funcOf(m.content),
    kind: str(own(headers, 'x-error-kind')),
    error: str(own(headers, 'x-error-message')),
    attempts: num(own(headers, 'x-attempts')),
    diedAt,
    // Ours, else the broker's record of the first death (a delivery limit reached), else where it is.
    routingKey:
      str(own(headers, 'x-original-routing-key')) ?? deathRoutingKey(headers) ?? m.fields.routingKey,
    replayed: num(own(headers, 'x-replayed')) ?? 0,
  };
  if (showBody) letter.body = m.content.toString('utf8');
  return letter;
}

/** A dead letter as a fresh task: its death headers gone, `x-replayed` counted, sent with its own routing key. */
export function replayCopy(
  m: GetMessage,
  letter: DeadLetter,
): { routingKey: string; options: Options.Publish } {
  // Not user-id: the broker refuses one that is not the publishing connection's user.
  const { headers, deliveryMode: _mode, userId: _user, ...kept } = m.properties;
  const fresh: Record<string, unknown> = {};
  for (const name of Object.keys(headers ?? {}))
    if (!DEATH_HEADERS.includes(name) && name !== 'x-original-routing-key' && name !== 'x-replayed')
      fresh[name] = (headers as Record<string, unknown>)[name];
  fresh['x-replayed'] = letter.replayed + 1;
  const options: Options.Publish = { persistent: true, mandatory: true, headers: fresh };
  for (const [key, value] of Object.entries(kept))
    if (value !== undefined) (options as Record<string, unknown>)[key] = value;
  return { routingKey: letter.routingKey, options };
}

/**
 * A dead letter as it is, sent to the back of its own queue: for a quorum queue, whose
 * messages the broker drops after a number of returns (20 by default on RabbitMQ 4), and
 * a pass returns what it does not act on.
 */
function renewedCopy(m: GetMessage): Options.Publish {
  const { headers, deliveryMode: _mode, userId: _user, ...kept } = m.properties;
  const fresh: Record<string, unknown> = {};
  for (const name of Object.keys(headers ?? {}))
    if (name !== 'x-delivery-count') fresh[name] = headers?.[name];
  const options: Options.Publish = { persistent: true, mandatory: true, headers: fresh };
  for (const [key, value] of Object.entries(kept))
    if (value !== undefined) (options as Record<string, unknown>)[key] = value;
  return options;
}

/** A quorum dead letter returned this often is renewed rather than returned once more (see renewedCopy). */
const RENEW_AFTER_RETURNS = 10;

/** How long a copy may wait for its confirm before it counts as failed (its dead letter stays). */
const CONFIRM_TIMEOUT_MS = 60_000;

/**
 * Copies in flight on one confirm channel: each dead letter is acked when its copy is
 * confirmed, and stays when it is not (nacked, returned, timed out, the channel gone). A
 * copy the work exchange cannot route (the original came through the default exchange,
 * say) is sent again straight to the work queue. A window of copies in flight keeps a
 * pass fast without holding much; two copies with the same body are never in flight at
 * once, so that a basic.return (matched by body) always names the right one.
 */
class Sender {
  readonly #channel: ConfirmChannel;
  readonly #source: Channel;
  /** Copies waiting for their confirm, in publish order: a basic.return comes before its confirm. */
  readonly #pending: { content: Buffer; returned: boolean }[] = [];
  readonly #inFlight = new Set<Promise<void>>();
  /** The confirm channel closed: nothing more can be sent in this pass. */
  closed = false;
  acted = 0;
  failed = 0;

  constructor(channel: ConfirmChannel, source: Channel) {
    this.#channel = channel;
    this.#source = source;
    channel.on('return', (r: { content: Buffer }) => {
      const entry = this.#pending.find((p) => !p.returned && p.content.equals(r.content));
      if (entry !== undefined) entry.returned = true;
    });
    channel.on('close', () => {
      this.closed = true;
    });
  }

  #send(exchange: string, key: string, m: GetMessage, options: Options.Publish): Promise<boolean> {
    const entry = { content: m.content, returned: false };
    this.#pending.push(entry);
    return new Promise((resolve) => {
      const settle = (ok: boolean) => {
        clearTimeout(timer);
        const at = this.#pending.indexOf(entry);
        if (at !== -1) this.#pending.splice(at, 1);
        resolve(ok);
      };
      const timer = setTimeout(() => settle(false), CONFIRM_TIMEOUT_MS);
      try {
        this.#channel.publish(exchange, key, m.content, options, (err) =>
          settle(err == null && !entry.returned),
        );
      } catch {
        settle(false); // the channel has closed, or the copy cannot be encoded
      }
    });
  }

  /** Sends the copy (to `exchange` and `key`, else to `fallbackQueue`), then acks `m` once it is confirmed. */
  async send(
    m: GetMessage,
    exchange: string,
    key: string,
    options: Options.Publish,
    fallbackQueue: string | undefined,
    counted: boolean,
  ): Promise<void> {
    while (
      this.#inFlight.size >= 64 ||
      (this.#inFlight.size > 0 && this.#pending.some((p) => p.content.equals(m.content)))
    )
      await Promise.race(this.#inFlight);
    const done = (async () => {
      let ok = await this.#send(exchange, key, m, options);
      if (!ok && fallbackQueue !== undefined && !this.closed)
        ok = await this.#send('', fallbackQueue, m, options);
      if (ok) {
        try {
          this.#source.ack(m);
          if (counted) this.acted++;
          return;
        } catch {
          // The dead-letter channel has gone: the dead letter is back in its queue.
        }
      }
      if (counted) this.failed++;
    })();
    this.#inFlight.add(done);
    void done.finally(() => this.#inFlight.delete(done)).catch(() => {});
  }

  async settled(): Promise<void> {
    await Promise.allSettled([...this.#inFlight]);
  }
}

/**
 * One pass over the dead-letter queue. The channel is closed at the end (or by a
 * failure), which gives back every dead letter not acted on, untouched.
 */
export async function deadLetterPass(connection: BrokerConnection, pass: DeadPass): Promise<DeadSummary> {
  const now = pass.now ?? Date.now();
  const channel: Channel = await connection.model.createChannel();
  channel.on('error', () => {});
  let sourceClosed = false;
  channel.on('close', () => {
    sourceClosed = true;
  });
  let confirm: ConfirmChannel | undefined;
  let sender: Sender | undefined;
  const senderOf = async (): Promise<Sender> => {
    if (sender === undefined) {
      confirm = await connection.model.createConfirmChannel();
      confirm.on('error', () => {});
      sender = new Sender(confirm, channel);
    }
    return sender;
  };
  const summary: DeadSummary = { seen: 0, matched: 0, acted: 0, failed: 0, possibleDuplicates: [] };
  const journal = pass.journal;
  const acting = pass.action !== 'list' && pass.dryRun !== true;
  try {
    const { messageCount } = await channel.checkQueue(pass.deadLetterQueue);
    const limit = pass.filter.limit ?? Number.POSITIVE_INFINITY;
    while (
      summary.seen < messageCount &&
      summary.matched < limit &&
      !sourceClosed &&
      sender?.closed !== true
    ) {
      const m = await channel.get(pass.deadLetterQueue, { noAck: false });
      if (m === false) break;
      summary.seen++;
      const letter = describeDeadLetter(m, pass.showBody === true);
      const key = journal === undefined ? undefined : deadLetterKey(m);
      if (key !== undefined && journal?.wasInFlight(key))
        summary.possibleDuplicates.push(letter.messageId ?? '-');
      const match = matches(letter, pass.filter, now);
      if (match) {
        summary.matched++;
        pass.onMatch(letter);
      }
      if (match && acting && pass.action === 'purge') {
        channel.ack(m);
        summary.acted++;
        continue;
      }
      if (match && acting) {
        if (key !== undefined) journal?.sending(key);
        const copy = replayCopy(m, letter);
        await (await senderOf()).send(m, pass.exchange, copy.routingKey, copy.options, pass.workQueue, true);
        continue;
      }
      // Not acted on: it goes back when the channel closes. A quorum queue counts that
      // return; one returned often is sent to the back of the queue instead, as it is.
      const returns = own(m.properties.headers, 'x-delivery-count');
      if (typeof returns === 'number' && returns >= RENEW_AFTER_RETURNS)
        await (await senderOf()).send(m, '', pass.deadLetterQueue, renewedCopy(m), undefined, false);
    }
    if (sender !== undefined) {
      await sender.settled();
      summary.acted += sender.acted;
      summary.failed += sender.failed;
    }
    // A replay or purge that ends leaves nothing of its own in doubt.
    if (acting && !sourceClosed && sender?.closed !== true) {
      const f = pass.filter;
      const whole =
        f.kind === undefined && f.func === undefined && f.limit === undefined && f.olderThanMs === undefined;
      journal?.done(whole && summary.seen >= messageCount);
    }
    return summary;
  } finally {
    await (confirm as ConfirmChannel | undefined)?.close().catch(() => {});
    // Acks are written before the close: what was not acked goes back, in its place.
    await channel.close().catch(() => {});
  }
}
