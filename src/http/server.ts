// The HTTP face of the service: probes, metrics and the authorised drain. buildServer()
// returns an instance that is not listening yet, so tests drive it with inject() and the
// service decides when to listen and (last of all, during a drain) when to close.
import { timingSafeEqual } from 'node:crypto';
import Fastify, {
  type FastifyBaseLogger,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
} from 'fastify';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import type { FuncStatus, WorkerStatus } from '../pool/pool.ts';

export type { FuncStatus } from '../pool/pool.ts';

/** What /health reports. `status` is "ok" only when the service can do its job now. */
export interface HealthReport {
  status: 'ok' | 'connecting' | 'reconnecting' | 'draining' | 'workers down';
  reason?: string;
  /** `broker`: the node the consuming connection is on, without its password. */
  /** `paused`: consuming waits while the master holds more bytes than --max-held-bytes. */
  amqp: { connected: boolean; blocked: boolean; paused: boolean; broker?: string };
  workers: { desired: number; up: number; busy: number };
  /** Messages received and not yet settled (busy workers are in `workers.busy`). */
  tasksInFlight: number;
}

/** What GET /status reports (behind the bearer token). */
export interface StatusReport {
  health: HealthReport;
  workers: WorkerStatus[];
  queued: number;
  prefetch: number;
  /** The functions that declare options of their own. */
  funcs: Record<string, FuncStatus>;
}

/** What GET /dead and POST /dead/replay|purge answer (see amqp/dead-letters.ts). */
export interface DeadAnswer {
  letters: Record<string, unknown>[];
  seen: number;
  matched: number;
  acted: number;
  failed: number;
  /** Message ids ("-" without one) whose copy a stopped replay had sent: they may be in the work queue too. */
  possibleDuplicates: string[];
}

/** What a cancel found here (DELETE /tasks/{id}): see Dispatcher.cancel. */
export type CancelAnswer = 'running' | 'queued' | 'remembered';

export interface HttpDeps {
  health: () => HealthReport;
  /** The detailed state behind GET /status. */
  status: () => StatusReport;
  /** Sets the number of workers (PUT /workers); throws a RangeError, with the reason, for a count it refuses (past --max-workers). */
  setWorkers: (count: number) => void;
  registry: Registry;
  /**
   * One pass over the dead-letter queue (`list`, `replay` or `purge`) with the filter of the
   * query or body; rejects with a RangeError, whose message is the reason, for a bad filter.
   */
  dead: (action: 'list' | 'replay' | 'purge', raw: Record<string, unknown>) => Promise<DeadAnswer>;
  /** Cancels a task by message id, here and (through the control exchange) on every replica. */
  cancel: (messageId: string) => CancelAnswer;
  /** Starts the graceful drain; must be idempotent. */
  requestShutdown: (reason: string) => void;
  /** Unset disables POST /shutdown (403). */
  shutdownToken: string | undefined;
  logger: Logger;
}

/** The routes, named once so that the probes in deploy/ and compose can be checked against them. */
export const ROUTES = {
  health: '/health',
  live: '/health/live',
  ready: '/health/ready',
  metrics: '/metrics',
  shutdown: '/shutdown',
  status: '/status',
  workers: '/workers',
  task: '/tasks/:messageId',
  dead: '/dead',
  deadReplay: '/dead/replay',
  deadPurge: '/dead/purge',
} as const;

/** What a message id may be: AMQP's shortstr, at most 255 bytes. */
const MAX_MESSAGE_ID_BYTES = 255;

/** pino's number for warn. */
const WARN = 40;

/**
 * The server's own limits, so that slow or many clients cannot use up the master's file
 * descriptors (which the next worker fork needs) or hold requests open for ever: a
 * request must arrive whole within REQUEST_TIMEOUT_MS (its headers within
 * HEADERS_TIMEOUT_MS), an idle keep-alive connection closes after KEEP_ALIVE_MS, and at
 * most MAX_CONNECTIONS are open at once (probes and scrapes need a handful).
 */
export const HTTP_LIMITS = {
  requestTimeoutMs: 10_000,
  headersTimeoutMs: 5_000,
  keepAliveMs: 5_000,
  maxConnections: 256,
} as const;

/** A request body, short, for an error message. */
function describe(body: unknown): string {
  const text = JSON.stringify(body) ?? 'no body';
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}

export function buildServer(deps: HttpDeps): FastifyInstance {
  const app = Fastify({
    // At warn (or quieter, when the service is): a line per probe and scrape every few
    // seconds would drown the task lines.
    loggerInstance: deps.logger.child(
      { component: 'http' },
      { level: deps.logger.levelVal < WARN ? 'warn' : deps.logger.level },
    ) as FastifyBaseLogger,
    return503OnClosing: false,
    // A message id is up to 255 bytes, three characters each once percent-encoded: the
    // route checks it, not a default of 100 that would answer 414 for a valid id.
    routerOptions: { maxParamLength: 800 },
    requestTimeout: HTTP_LIMITS.requestTimeoutMs,
    connectionTimeout: HTTP_LIMITS.requestTimeoutMs,
    keepAliveTimeout: HTTP_LIMITS.keepAliveMs,
  });
  app.server.headersTimeout = HTTP_LIMITS.headersTimeoutMs;
  app.server.maxConnections = HTTP_LIMITS.maxConnections;
  // An empty body of any type (`curl -d '' ...` sends one as a form) is no body: an
  // operator's POST /shutdown must not fail on its content type. A non-empty body of a
  // type other than JSON is refused as usual (415).
  app.addContentTypeParser('*', { parseAs: 'buffer' }, (_req, body: Buffer, done) => {
    if (body.length === 0) done(null, undefined);
    else done(Object.assign(new Error('Unsupported Media Type'), { statusCode: 415 }), undefined);
  });

  const sendHealth = async (_req: unknown, reply: FastifyReply) => {
    const report = deps.health();
    return reply.code(report.status === 'ok' ? 200 : 503).send(report);
  };
  app.get(ROUTES.health, sendHealth);
  app.get(ROUTES.ready, sendHealth);
  app.get(ROUTES.live, async () => ({ status: 'ok' }));

  app.get(ROUTES.metrics, async (_req, reply) => {
    const body = await deps.registry.metrics();
    return reply.type(deps.registry.contentType).send(body);
  });

  // The bearer rules of every operating route, checked on request, before the body is
  // read: a caller without the token learns nothing, not even whether its body was valid.
  const authorise = async (req: FastifyRequest, reply: FastifyReply) => {
    const verdict = checkBearer(req.headers.authorization, deps.shutdownToken);
    if (verdict === 'disabled') {
      return reply.code(403).send({ error: 'operating over HTTP is disabled: SHUTDOWN_TOKEN is not set' });
    }
    if (verdict === 'denied') {
      return reply
        .code(401)
        .header('www-authenticate', 'Bearer')
        .send({ error: 'a valid Authorization: Bearer token is required' });
    }
  };

  app.get(ROUTES.status, { onRequest: authorise }, async () => deps.status());

  app.put(ROUTES.workers, { onRequest: authorise }, async (req, reply) => {
    const body = req.body as { count?: unknown } | null | undefined;
    const count = typeof body === 'object' && body !== null ? body.count : undefined;
    if (typeof count !== 'number' || !Number.isSafeInteger(count) || count < 1) {
      return reply.code(400).send({
        error: `the body must be {"count": N} with N a whole number of at least 1 (got ${describe(body)})`,
      });
    }
    try {
      deps.setWorkers(count);
    } catch (err) {
      if ((err as { code?: unknown }).code === 'ERR_POOL_CLOSED')
        return reply.code(409).send({ error: 'the service is draining: the pool cannot be resized' });
      if (err instanceof RangeError) return reply.code(400).send({ error: err.message });
      throw err;
    }
    // On the service's logger: the http one is at warn, and an operator's action belongs in the log.
    deps.logger.info({ count }, 'workers set over HTTP');
    return reply.code(202).send({ count });
  });

  app.delete(ROUTES.task, { onRequest: authorise }, async (req, reply) => {
    const { messageId } = req.params as { messageId: string };
    if (messageId === '' || Buffer.byteLength(messageId) > MAX_MESSAGE_ID_BYTES)
      return reply
        .code(400)
        .send({ error: `a message id is 1 to ${MAX_MESSAGE_ID_BYTES} bytes (AMQP's message-id property)` });
    const result = deps.cancel(messageId);
    deps.logger.info({ messageId, result }, 'task cancelled over HTTP');
    return reply.code(200).send({ messageId, result });
  });

  const deadPass = async (
    action: 'list' | 'replay' | 'purge',
    raw: Record<string, unknown>,
    reply: FastifyReply,
  ) => {
    // A pass over a long queue may take longer than the server's idle timeout: this one
    // socket waits for it (the pass itself bounds each step).
    const socket = reply.raw.socket as { setTimeout?: (ms: number) => unknown } | null;
    if (typeof socket?.setTimeout === 'function') socket.setTimeout(0);
    try {
      return reply.code(200).send(await deps.dead(action, raw));
    } catch (err) {
      if (err instanceof RangeError) return reply.code(400).send({ error: err.message });
      throw err;
    }
  };
  app.get(ROUTES.dead, { onRequest: authorise }, async (req, reply) =>
    deadPass('list', { ...(req.query as Record<string, unknown>) }, reply),
  );
  app.post(ROUTES.deadReplay, { onRequest: authorise }, async (req, reply) =>
    deadPass('replay', { ...((req.body as Record<string, unknown> | undefined) ?? {}) }, reply),
  );
  app.post(ROUTES.deadPurge, { onRequest: authorise }, async (req, reply) => {
    const body = (req.body as Record<string, unknown> | undefined) ?? {};
    if (body.yes !== true)
      return reply
        .code(400)
        .send({ error: 'purge acks dead letters for good: send {"yes": true} with the filter' });
    return deadPass('purge', { ...body }, reply);
  });

  app.post(ROUTES.shutdown, { onRequest: authorise }, async (_req, reply) => {
    deps.logger.info('shutdown requested over HTTP');
    deps.requestShutdown('http');
    return reply.code(202).send({ status: 'draining' });
  });

  return app;
}

export type BearerVerdict = 'ok' | 'denied' | 'disabled';

/** Compares the bearer token in constant time, so that its length and content do not leak through timing. */
export function checkBearer(header: string | undefined, token: string | undefined): BearerVerdict {
  if (token === undefined || token === '') return 'disabled';
  const match = /^Bearer (.+)$/i.exec(header ?? '');
  if (!match?.[1]) return 'denied';
  const given = Buffer.from(match[1]);
  const expected = Buffer.from(token);
  // timingSafeEqual needs equal lengths; compare against itself to keep the time flat.
  const same = given.length === expected.length && timingSafeEqual(given, expected);
  if (given.length !== expected.length) timingSafeEqual(expected, expected);
  return same ? 'ok' : 'denied';
}
