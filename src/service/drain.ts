// The graceful drain (README "Stopping"), in its order: stop consuming, give back what has
// not started, let running tasks finish until the shutdown timeout, settle them, stop the
// workers, close the connections, and the HTTP server last. Kept apart from the service's
// composition (service.ts): the order is the contract, and it is read here in one place.
import type { FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import type { AmqpConsumer } from '../amqp/consumer.ts';
import type { AutoPrefetch } from '../amqp/prefetch.ts';
import type { AmqpPublisher } from '../amqp/publisher.ts';
import type { Dispatcher } from '../dispatch/dispatcher.ts';
import type { ServiceError } from '../errors.ts';
import type { Pool } from '../pool/pool.ts';
import type { TaskTracer } from '../telemetry/task-tracer.ts';
import { settlesWithin } from '../util/deadline.ts';

/** How the service ended: the exit code the CLI should use, and why. */
export interface ServiceExit {
  code: number;
  reason: string;
  /** The error that stopped the service, when one did. */
  error?: ServiceError;
}

/** What the drain stops, in its order. */
export interface DrainParts {
  /** --shutdown-timeout, in seconds. */
  shutdownTimeout: number;
  log: Logger;
  autoPrefetch: AutoPrefetch | undefined;
  pool: Pool;
  consumer: AmqpConsumer;
  dispatcher: Dispatcher;
  publisher: AmqpPublisher;
  /** Read at the end: tracing may have started while the drain ran (a signal during start-up). */
  tracer: () => TaskTracer | undefined;
  http: FastifyInstance;
}

/**
 * The drain, raced against a safety net past the shutdown timeout for a broker that stops
 * answering mid-drain.
 */
export function drainInOrder(parts: DrainParts, reason: string, code: number): Promise<ServiceExit> {
  return Promise.race([drain(parts, reason, code), overdue(parts.shutdownTimeout)]);
}

function overdue(shutdownTimeout: number): Promise<ServiceExit> {
  const ms = (shutdownTimeout + 15) * 1000;
  return new Promise((resolve) => {
    setTimeout(() => resolve({ code: 1, reason: 'the drain did not finish in time' }), ms).unref();
  });
}

async function drain(parts: DrainParts, reason: string, code: number): Promise<ServiceExit> {
  const { log, pool, consumer, dispatcher, publisher, shutdownTimeout } = parts;
  const graceMs = shutdownTimeout * 1000;
  const deadline = performance.now() + graceMs;
  log.info({ reason, shutdownTimeout }, 'draining');
  parts.autoPrefetch?.stop();
  // No task starts from here: the consumer's cancel takes a round trip to the broker (and
  // longer when it is slow or gone), and what has not started must go back, not run.
  pool.stopStarting();
  await consumer.cancel();
  const settled = dispatcher.drain();
  await pool.close(Math.max(0, deadline - performance.now()));
  // The tasks are over; what may remain is publishing their dead letters and replies. A
  // publish that cannot finish by the deadline (publishing blocked by an alarm, a broker
  // that stopped answering) is failed by closing the publisher: its message goes back
  // to the queue, and the drain ends on time.
  if (!(await settlesWithin(settled, deadline - performance.now()))) {
    log.warn('publishes still waiting at the shutdown deadline: their messages go back to the queue');
    await publisher.close();
    await settlesWithin(settled, 1_000);
  }
  await Promise.all([consumer.close(), publisher.close()]);
  // The last spans go out before the process ends (bounded: a collector may be down).
  const tracer = parts.tracer();
  if (tracer !== undefined)
    await settlesWithin(
      tracer.shutdown().catch(() => {}),
      5_000,
    );
  await parts.http.close();
  return { code, reason };
}
