// Connection settings that every connection of the service shares.
import type { Options } from 'amqplib';

/** RabbitMQ advises heartbeats of 5 to 20 s; the server suggests 60, too slow to notice a dead peer. */
export const DEFAULT_HEARTBEAT_SECONDS = 10;

/** The URL with a heartbeat, unless the user chose one. */
export function withHeartbeat(url: string): string {
  const parsed = new URL(url);
  if (!parsed.searchParams.has('heartbeat'))
    parsed.searchParams.set('heartbeat', String(DEFAULT_HEARTBEAT_SECONDS));
  return parsed.toString();
}

/**
 * Named connections show up by purpose in the management UI and `rabbitmqctl list_connections`.
 * TCP_NODELAY: amqplib leaves Nagle's algorithm on, which holds a small write (an ack, a
 * reply) while an earlier segment is unacknowledged; our writes are already batched
 * where batching pays (acks), so a hold only adds latency.
 */
export function socketOptions(
  purpose: 'consume' | 'publish' | 'client',
): Options.Connect & Record<string, unknown> {
  return {
    noDelay: true,
    clientProperties: { connection_name: `amqp-concurrency ${purpose} (pid ${process.pid})` },
  };
}

/** The broker URLs of a --amqp-url value: one, or a comma-separated list (a cluster). */
export function splitUrls(raw: string): string[] {
  return raw
    .split(',')
    .map((u) => u.trim())
    .filter((u) => u !== '');
}

/** The URL(s) with passwords replaced, for logs, errors and /health. */
export function redactUrl(raw: string): string {
  if (raw.includes(',')) return splitUrls(raw).map(redactUrl).join(',');
  try {
    const url = new URL(raw);
    if (url.password !== '') url.password = '***';
    return url.toString();
  } catch {
    return raw.replace(/\/\/([^:/@]*):[^@/]*@/, '//$1:***@');
  }
}
