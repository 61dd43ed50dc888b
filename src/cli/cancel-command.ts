// amqp-concurrency cancel ID [--wait SECONDS] [--queue NAME] [--amqp-url URL]
// Sends a cancel for one message id over the control exchange (`<queue>.control`, fanout),
// which every replica of the service hears (README "Cancel"), and prints what each one
// found: running (signalled, then killed after its grace), queued (dropped unrun), or
// remembered (a later delivery of it ends unrun).
import { randomUUID } from 'node:crypto';
import { controlExchangeName } from '../amqp/control.ts';
import { parseConfig } from '../config/options.ts';
import { type Io, lastFlag, splitArgs, usage } from './args.ts';
import { connectCommand } from './connect.ts';

export const CANCEL_HELP = `Usage: amqp-concurrency cancel MESSAGE_ID [options]

Cancels the task with this message id on every replica of the service that consumes
--queue: one running gets its AbortSignal, then the kill after its grace; one waiting
in a replica is dropped unrun; anywhere else (still in the queue, in a delay queue, not
yet published) its id is remembered for 3 hours, and its delivery ends unrun. Either
way it is dead-lettered with x-error-kind: cancelled. Prints what each replica found.

  --wait SECONDS         how long to collect the replicas' answers (default 2)
  --queue NAME           [QUEUE] the service's work queue (default curio_amqp_queue)
  --amqp-url URL         [AMQP_URL] (--amqp_url also works; default testuser, then guest, on localhost)
  --help                 print this help

Exit codes: 0 at least one replica answered, 1 none did (or the broker failed), 2 bad usage.`;

const AMQP_FLAGS = ['--amqp-url', '--amqp_url', '--queue'];

export interface CancelPlan {
  messageId: string;
  waitMs: number;
  url: string | undefined;
  queue: string;
}

export function parseCancelArgs(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): CancelPlan | 'help' {
  const { flags, words, help } = splitArgs(argv, ['--wait', ...AMQP_FLAGS]);
  if (help) return 'help';
  const [messageId, ...rest] = words;
  if (messageId === undefined || messageId === '') usage('cancel: MESSAGE_ID is missing (see cancel --help)');
  if (rest.length > 0) usage(`${rest[0]}: unexpected argument (cancel takes one MESSAGE_ID)`);
  if (Buffer.byteLength(messageId) > 255) usage('cancel: a message id is at most 255 bytes');
  const waitRaw = lastFlag(flags, '--wait');
  const wait = Number(waitRaw ?? '2');
  if (waitRaw?.trim() === '' || !Number.isFinite(wait) || wait <= 0 || wait > 600)
    usage(`--wait: must be a number of seconds from over 0 to 600 (got ${JSON.stringify(waitRaw)})`);
  const parsed = parseConfig(
    flags.filter(([name]) => AMQP_FLAGS.includes(name)).map(([name, value]) => `${name}=${value}`),
    { AMQP_URL: env.AMQP_URL, QUEUE: env.QUEUE },
  );
  if (parsed.kind !== 'run') usage('cancel: unexpected option');
  const { amqpUrl, amqpUrlGiven, queue } = parsed.config;
  return { messageId, waitMs: wait * 1000, url: amqpUrlGiven ? amqpUrl : undefined, queue };
}

export async function cancelCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  io: Io,
): Promise<number> {
  const plan = parseCancelArgs(argv, env);
  if (plan === 'help') {
    io.out(`${CANCEL_HELP}\n`);
    return 0;
  }
  const connection = await connectCommand(plan.url);
  try {
    const channel = await connection.model.createChannel();
    channel.on('error', () => {});
    const exchange = controlExchangeName(plan.queue);
    try {
      await channel.checkExchange(exchange);
    } catch {
      io.err(
        `no service has consumed ${JSON.stringify(plan.queue)} on this broker (there is no exchange ${exchange}): check --queue\n`,
      );
      return 1;
    }
    const replies = await channel.assertQueue('', { exclusive: true, autoDelete: true, durable: false });
    const correlationId = randomUUID();
    const answers: { replica: string; result: string }[] = [];
    await channel.consume(
      replies.queue,
      (m) => {
        if (m === null || m.properties.correlationId !== correlationId) return;
        try {
          const answer = JSON.parse(m.content.toString('utf8')) as { replica?: unknown; result?: unknown };
          if (typeof answer.replica === 'string' && typeof answer.result === 'string')
            answers.push({ replica: answer.replica, result: answer.result });
        } catch {
          // Not an answer of ours.
        }
      },
      { noAck: true },
    );
    channel.publish(exchange, '', Buffer.from(JSON.stringify({ cancel: plan.messageId })), {
      contentType: 'application/json',
      replyTo: replies.queue,
      correlationId,
    });
    await new Promise((resolve) => setTimeout(resolve, plan.waitMs));
    if (answers.length === 0) {
      io.err(
        `no replica answered within ${plan.waitMs / 1000} s: none consumes ${JSON.stringify(plan.queue)} now, so the cancel is remembered nowhere\n`,
      );
      return 1;
    }
    for (const { replica, result } of answers) io.out(`${replica}\t${result}\n`);
    return 0;
  } finally {
    await connection.close().catch(() => {});
  }
}
