// amqp-concurrency dead list|replay|purge [filters] [--json] [--show-body] [--dry-run] [--yes]
// What an operator does the morning after (README "Dead letters"): see what died and why,
// replay it once the bug is fixed, purge what is hopeless. The work itself is
// amqp/dead-letters.ts; this reads argv and prints.
import { type DeadFilter, parseDeadFilter } from '../amqp/dead-filter.ts';
import { type DeadAction, type DeadLetter, deadLetterPass } from '../amqp/dead-letters.ts';
import { ReplayJournal, replayJournalPath } from '../amqp/replay-journal.ts';
import { deadLetterQueueName } from '../amqp/topology.ts';
import { parseConfig } from '../config/options.ts';
import { type Io, lastFlag, splitArgs, usage } from './args.ts';
import { connectCommand } from './connect.ts';

export const DEAD_HELP = `Usage: amqp-concurrency dead list|replay|purge [options]

  list     prints the dead letters of --queue (QUEUE.dead): id, func, kind, attempts,
           when it died, routing key and error; never the body unless --show-body
  replay   sends matching dead letters back to the work exchange with their routing key,
           x-attempts reset and x-replayed counted; each copy is confirmed before its
           dead letter is acked (--dry-run: say what would be sent, send nothing)
  purge    acks matching dead letters for good (needs --yes)

A dead letter that does not match is left as it was, in its place.

  --kind KIND            failed, timeout, crashed, rejected or cancelled
  --func NAME            only this func
  --limit N              at most N matching dead letters
  --older-than DURATION  only those that died at least this long ago (45s, 30m, 2h, 7d)
  --json                 one JSON object per line instead of a table
  --show-body            with list: include each body
  --dry-run              with replay: send nothing
  --yes                  with purge: really ack them
  --queue NAME           [QUEUE] the service's work queue (default curio_amqp_queue)
  --exchange NAME        [EXCHANGE] where replay sends (default curio_amqp_exchange)
  --amqp-url URL         [AMQP_URL] (--amqp_url also works; default testuser, then guest, on localhost)
  --state-dir DIR        [STATE_DIR] where a replay writes down what it sends, so that the
                         next pass reports possible duplicates if it is stopped midway

Exit codes: 0 done, 1 the broker failed or a replayed copy was not confirmed, 2 bad usage.`;

const AMQP_FLAGS = ['--amqp-url', '--amqp_url', '--queue', '--exchange', '--state-dir'];

export interface DeadPlan {
  action: DeadAction;
  filter: DeadFilter;
  json: boolean;
  showBody: boolean;
  dryRun: boolean;
  url: string | undefined;
  queue: string;
  exchange: string;
  /** Where the replay journal lives (--state-dir, as the service's). */
  stateDir: string;
}

export function parseDeadArgs(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): DeadPlan | 'help' {
  const { flags, words, help } = splitArgs(
    argv,
    ['--kind', '--func', '--limit', '--older-than', ...AMQP_FLAGS],
    ['--json', '--show-body', '--dry-run', '--yes'],
  );
  if (help) return 'help';
  const [action, ...rest] = words;
  if (action !== 'list' && action !== 'replay' && action !== 'purge')
    usage(`dead: say list, replay or purge (got ${JSON.stringify(action ?? '')}; see dead --help)`);
  if (rest.length > 0) usage(`${rest[0]}: unexpected argument`);
  const has = (name: string) => lastFlag(flags, name) !== undefined;
  const filter = parseDeadFilter({
    kind: lastFlag(flags, '--kind'),
    func: lastFlag(flags, '--func'),
    limit: lastFlag(flags, '--limit'),
    olderThan: lastFlag(flags, '--older-than'),
  });
  if (typeof filter === 'string') usage(filter);
  if (has('--show-body') && action !== 'list') usage('--show-body: only with list');
  if (has('--dry-run') && action !== 'replay') usage('--dry-run: only with replay');
  if (action === 'purge' && !has('--yes')) usage('purge: acks dead letters for good; add --yes');
  const parsed = parseConfig(
    flags.filter(([name]) => AMQP_FLAGS.includes(name)).map(([name, value]) => `${name}=${value}`),
    { AMQP_URL: env.AMQP_URL, QUEUE: env.QUEUE, EXCHANGE: env.EXCHANGE, STATE_DIR: env.STATE_DIR },
  );
  if (parsed.kind !== 'run') usage('dead: unexpected option');
  const { amqpUrl, amqpUrlGiven, queue, exchange, stateDir } = parsed.config;
  return {
    action,
    filter,
    json: has('--json'),
    showBody: has('--show-body'),
    dryRun: has('--dry-run'),
    url: amqpUrlGiven ? amqpUrl : undefined,
    queue,
    exchange,
    stateDir,
  };
}

const cell = (value: unknown) => (value === undefined ? '-' : String(value).replace(/\s+/g, ' '));

/** One dead letter as a table row: id, func, kind, attempts, died, routing key, error. */
export function deadRow(letter: DeadLetter): string {
  const died = letter.diedAt === undefined ? '-' : new Date(letter.diedAt).toISOString();
  const error = letter.error === undefined ? '-' : cell(letter.error).slice(0, 80);
  const row = [letter.messageId, letter.func, letter.kind, letter.attempts, died, letter.routingKey].map(
    cell,
  );
  return `${row.join('\t')}\t${error}${letter.body === undefined ? '' : `\t${letter.body}`}`;
}

export async function deadCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  io: Io,
): Promise<number> {
  const plan = parseDeadArgs(argv, env);
  if (plan === 'help') {
    io.out(`${DEAD_HELP}\n`);
    return 0;
  }
  const connection = await connectCommand(plan.url);
  try {
    if (!plan.json) io.out('ID\tFUNC\tKIND\tATTEMPTS\tDIED\tROUTING KEY\tERROR\n');
    const summary = await deadLetterPass(connection, {
      action: plan.action,
      deadLetterQueue: deadLetterQueueName(plan.queue),
      exchange: plan.exchange,
      workQueue: plan.queue,
      filter: plan.filter,
      dryRun: plan.dryRun,
      showBody: plan.showBody,
      journal: new ReplayJournal(replayJournalPath(plan.stateDir, plan.queue)),
      onMatch: (letter) => io.out(plan.json ? `${JSON.stringify(letter)}\n` : `${deadRow(letter)}\n`),
    });
    const verb =
      plan.action === 'list'
        ? 'listed'
        : plan.dryRun
          ? 'would replay'
          : plan.action === 'replay'
            ? 'replayed'
            : 'purged';
    const count = plan.action === 'list' || plan.dryRun ? summary.matched : summary.acted;
    const doubts = summary.possibleDuplicates;
    io.err(
      `${verb} ${count} of ${summary.seen} dead letters read${summary.failed > 0 ? `; ${summary.failed} not confirmed, left in place` : ''}${
        doubts.length > 0
          ? `; ${doubts.length} possible duplicates (a replay was stopped after sending their copies: they may be in the work queue too): ${doubts.slice(0, 20).join(', ')}`
          : ''
      }\n`,
    );
    return summary.failed > 0 ? 1 : 0;
  } finally {
    await connection.close().catch(() => {});
  }
}
