// What the operator is told as the service starts, once each: settings that work but are
// likely not what was meant, or that give up a protection.
import type { Logger } from 'pino';
import { userOf } from '../amqp/connection.ts';
import { DEFAULT_URLS } from '../amqp/defaults.ts';
import type { Config } from '../config/option-table.ts';
import { CRASH_LIMIT } from '../dispatch/crash-journal.ts';

/** Tokens that ship in examples (docker-compose.yml): a service that runs with one is warned about. */
const PLACEHOLDER_TOKENS = new Set(['change-me']);

/** `journalProblem`: why the crash journal cannot be kept, if it cannot (CrashJournal.problem). */
export function startNotices(config: Config, journalProblem: string | undefined, log: Logger): void {
  if (journalProblem !== undefined)
    log.warn(
      { problem: journalProblem },
      `the crash journal cannot be kept: a message that stops the master is not dead-lettered after ${CRASH_LIMIT} deaths; give --state-dir a folder of this user's`,
    );
  if (config.shutdownToken !== undefined && PLACEHOLDER_TOKENS.has(config.shutdownToken))
    log.warn(
      'SHUTDOWN_TOKEN is a placeholder (change-me): anyone who can reach the HTTP port can stop the service; set a secret of your own',
    );
  if (!config.amqpUrlGiven)
    log.info(
      `no --amqp-url given: logging in as ${DEFAULT_URLS.map(userOf).join(', then as ')} on localhost (the "consuming" line says which)`,
    );
}
