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

/** What /health reports. `status` is "ok" only when the service can do its job now. */
export interface HealthReport {
  status: 'ok' | 'connecting' | 'reconnecting' | 'draining' | 'workers down' | 'stopped';
  reason?: string;
  /** `broker`: the node the consuming connection is on, without its password. */
  amqp: { connected: boolean; blocked: boolean; broker?: string };
  workers: { desired: number; up: number; busy: number };
  /** Messages received and not yet settled (busy workers are in `workers.busy`). */
  tasksInFlight: number;
}

/** One worker as GET /status shows it. */
export interface WorkerStatus {
  pid: number | undefined;
  state: 'starting' | 'idle' | 'busy' | 'stopping';
  /** The func it runs now, when busy. */
  func: string | undefined;
  /** How long the current task has run, when busy. */
  runningForMs: number | undefined;
  tasksDone: number;
  /** Resident memory of the worker process, when known (read between tasks). */
  rssBytes: number | undefined;
}

/** What GET /status reports (behind the bearer token). */
export interface StatusReport {
  health: HealthReport;
  workers: WorkerStatus[];
  queued: number;
  prefetch: number;
}

export interface HttpDeps {
  health: () => HealthReport;
  /** The detailed state behind GET /status. */
  status: () => StatusReport;
  /** Sets the number of workers (PUT /workers); throws a RangeError for a bad count. */
  setWorkers: (count: number) => void;
  registry: Registry;
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
} as const;

/** pino's number for warn. */
const WARN = 40;

/** The most workers PUT /workers sets: a typo must not fork ten thousand processes. */
export const MAX_WORKERS = 1000;

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
    if (typeof count !== 'number' || !Number.isSafeInteger(count) || count < 1 || count > MAX_WORKERS) {
      return reply.code(400).send({
        error: `the body must be {"count": N} with N a whole number from 1 to ${MAX_WORKERS} (got ${describe(body)})`,
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
