// GET /dead and POST /dead/replay|purge (README "Dead letters"): one pass over the
// dead-letter queue, on a connection of its own to the service's own addresses, with the
// same filter and journal as `amqp-concurrency dead`. At most 1,000 letters are answered.
import type { Logger } from 'pino';
import type { AddressList } from '../amqp/connection.ts';
import { openFirst } from '../amqp/connection.ts';
import { parseDeadFilter } from '../amqp/dead-filter.ts';
import { type DeadLetter, deadLetterPass } from '../amqp/dead-letters.ts';
import { ReplayJournal, replayJournalPath } from '../amqp/replay-journal.ts';
import { deadLetterQueueName } from '../amqp/topology.ts';
import type { DeadAnswer } from '../http/server.ts';

/** The most letters one answer carries. */
const MAX_ANSWERED = 1_000;

export interface DeadOverHttpContext {
  addresses: AddressList;
  connectTimeoutMs: number;
  queue: string;
  exchange: string;
  stateDir: string;
  logger: Logger;
}

/**
 * One pass for `action`, from the request's fields (query or JSON body, named as in the
 * API). A bad field is a RangeError that names it (the server answers 400).
 */
export async function deadOverHttp(
  action: 'list' | 'replay' | 'purge',
  raw: Record<string, unknown>,
  context: DeadOverHttpContext,
): Promise<DeadAnswer> {
  const filter = parseDeadFilter({
    kind: raw.kind,
    func: raw.func,
    limit: raw.limit,
    olderThan: raw.olderThan,
  });
  if (typeof filter === 'string')
    throw new RangeError(filter.replace(/^--older-than/, 'olderThan').replace(/^--/, ''));
  const flag = (value: unknown) => value === true || value === 'true';
  const dryRun = action === 'replay' && flag(raw.dryRun);
  filter.limit ??= action === 'list' || dryRun ? 100 : undefined;
  const letters: DeadLetter[] = [];
  const connection = await openFirst(context.addresses, {
    purpose: 'client',
    connectTimeoutMs: context.connectTimeoutMs,
    logger: context.logger,
  });
  try {
    const summary = await deadLetterPass(connection, {
      action,
      deadLetterQueue: deadLetterQueueName(context.queue),
      exchange: context.exchange,
      workQueue: context.queue,
      filter,
      dryRun,
      showBody: action === 'list' && flag(raw.showBody),
      journal: new ReplayJournal(replayJournalPath(context.stateDir, context.queue)),
      onMatch: (letter) => {
        if (letters.length < MAX_ANSWERED) letters.push(letter);
      },
    });
    context.logger.info(
      { action, dryRun, ...summary, possibleDuplicates: summary.possibleDuplicates.length },
      'dead letters over HTTP',
    );
    return { letters: letters as unknown as Record<string, unknown>[], ...summary };
  } finally {
    await connection.close().catch(() => {});
  }
}
