// The topology every connect declares (amqp/topology.ts), built from the Config and kept
// up to date while the service runs. Two things in it change: the consumer timeout the
// work queue asks for follows the longest hold a task's own limits allow (a task module
// may declare a longer time limit than the flags'), and a delay queue is added when it is
// first used. The consumer and the publisher read the same object, so their next
// (re)connect declares what it says now.
import type { Logger } from 'pino';
import { type HoldLimits, neededConsumerTimeoutMs } from '../amqp/consumer-timeout.ts';
import { MAX_PER_WORKER, perWorkerShare } from '../amqp/prefetch.ts';
import { retryDelays, type Topology } from '../amqp/topology.ts';
import type { Config } from '../config/option-table.ts';

export class LiveTopology {
  readonly topology: Topology;
  readonly #holds: HoldLimits;
  readonly #log: Logger;
  /** Declares the topology now, on the publishing connection. */
  readonly #declare: () => Promise<void>;
  /** Delay queues declared or being declared, by TTL. */
  readonly #declaringSteps = new Map<number, Promise<void>>();

  /** `declare`: declares the topology on the publishing connection (called only once consuming may run). */
  constructor(config: Config, log: Logger, declare: () => Promise<void>) {
    this.#log = log;
    this.#declare = declare;
    this.#holds = {
      workerTimeout: config.workerTimeout,
      killGrace: config.killGrace,
      perWorker: config.prefetchAuto ? MAX_PER_WORKER : perWorkerShare(config.prefetch, config.workers),
    };
    this.topology = {
      exchange: config.exchange,
      queue: config.queue,
      routingKey: config.routingKey,
      queueType: config.queueType,
      deliveryLimit: config.deliveryLimit,
      retryDelaysMs: retryDelays(config.maxRetries, config.retryDelay * 1000, config.retryDelayMax * 1000),
      maxPriority: config.maxPriority,
      delaySteps: new Set(),
      // Past the longest a delivery can wait here (a fixed window keeps its share per
      // worker; the automatic one is bounded): the broker's timeout never fires first.
      // Raised by fitConsumerTimeout when a task declares a longer time limit of its own.
      consumerTimeoutMs: neededConsumerTimeoutMs(this.#holds),
    };
  }

  /**
   * A task that declares a longer time limit (or grace) than the flags' makes the longest
   * hold longer: the work queue's consumer timeout follows, before the first declaration.
   */
  fitConsumerTimeout(
    limits: Readonly<Record<string, { timeoutMs?: number; killGraceMs?: number }>>,
    reloaded = false,
  ): void {
    let workerTimeout = this.#holds.workerTimeout;
    let killGrace = this.#holds.killGrace;
    for (const limit of Object.values(limits)) {
      if (limit.timeoutMs !== undefined) workerTimeout = Math.max(workerTimeout, limit.timeoutMs / 1000);
      if (limit.killGraceMs !== undefined) killGrace = Math.max(killGrace, limit.killGraceMs / 1000);
    }
    const needed = neededConsumerTimeoutMs({ ...this.#holds, workerTimeout, killGrace });
    const declared = this.topology.consumerTimeoutMs;
    this.topology.consumerTimeoutMs = needed;
    // After a reload: the queue keeps the value it was declared with (a queue's arguments
    // never change); the next consumer asks for the new one where the broker honours it.
    if (reloaded && declared !== undefined && needed > declared)
      this.#log.warn(
        { neededMs: needed, declaredMs: declared },
        "the reloaded task code allows longer runs than the work queue's consumer timeout: restart the service so that the broker's timeout covers them",
      );
  }

  /**
   * A delay queue is declared when first used (topology.ts): added to the topology, which
   * every later (re)connect declares, and declared now on the publishing connection. Once
   * per TTL; a failure is tried again with the next delayed message.
   */
  declareDelayQueue(stepMs: number): Promise<void> {
    const steps = this.topology.delaySteps as Set<number>;
    let declaring = this.#declaringSteps.get(stepMs);
    if (declaring === undefined) {
      steps.add(stepMs);
      declaring = this.#declare().catch((err: unknown) => {
        this.#declaringSteps.delete(stepMs);
        throw err;
      });
      this.#declaringSteps.set(stepMs, declaring);
    }
    return declaring;
  }
}
