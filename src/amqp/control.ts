// The control exchange (README "Cancel"): operators' orders that every replica of a
// service must hear, such as a cancel by message id. It is a durable fanout exchange,
// `<queue>.control`; each service binds an exclusive queue of its own to it for the life
// of its consuming connection (a fresh one after each reconnect), and reads it without
// acks: an order is a broadcast of the moment, and one missed during a reconnect is no
// worse than one sent before the service started (a cancel is also remembered where it
// was sent over HTTP).
//
// An order is a JSON body `{"cancel": "<message id>"}`. When it has a `reply_to`, each
// replica answers there with `{"replica": "...", "result": "..."}` and the same
// correlation id, so that `amqp-concurrency cancel` can say what each one found.
import type { Channel, ConsumeMessage } from 'amqplib';
import type { Logger } from 'pino';
import type { BrokerConnection } from './connection.ts';

export function controlExchangeName(queue: string): string {
  return `${queue}.control`;
}

/** The header that names the replica that sent an order: it does not act on its own again. */
export const ORIGIN_HEADER = 'x-origin';

export interface ControlOrder {
  cancel: string;
  origin: string | undefined;
  replyTo: string | undefined;
  correlationId: string | undefined;
}

/** What a control message says, or undefined when it is not an order this version knows. */
export function readOrder(message: ConsumeMessage): ControlOrder | undefined {
  if (message.content.length > 4096) return undefined;
  let body: unknown;
  try {
    body = JSON.parse(message.content.toString('utf8'));
  } catch {
    return undefined;
  }
  const cancel = (body as { cancel?: unknown } | null)?.cancel;
  if (typeof cancel !== 'string' || cancel === '' || Buffer.byteLength(cancel) > 255) return undefined;
  const origin = message.properties.headers?.[ORIGIN_HEADER];
  const { replyTo, correlationId } = message.properties;
  return {
    cancel,
    origin: typeof origin === 'string' ? origin : undefined,
    // Direct reply-to needs the consumer on the same channel, which the sender's is not:
    // answering there would close our channel (406). A queue name is at most 255 bytes.
    replyTo:
      typeof replyTo === 'string' &&
      replyTo !== '' &&
      Buffer.byteLength(replyTo) <= 255 &&
      !replyTo.startsWith('amq.rabbitmq.reply-to')
        ? replyTo
        : undefined,
    correlationId: typeof correlationId === 'string' ? correlationId : undefined,
  };
}

/**
 * Listens on the control exchange for the life of `connection`, on a channel of its own
 * (a refusal closes that channel, never the consuming one). Resolves once listening.
 */
export async function listenForOrders(
  connection: BrokerConnection,
  queue: string,
  onOrder: (order: ControlOrder, channel: Channel) => void,
  log: Logger,
): Promise<void> {
  const channel = await connection.step('opening the control channel', () =>
    connection.model.createChannel(),
  );
  channel.on('error', (err) => log.warn({ err }, 'the control channel closed'));
  // Closed by an error while the connection lives on: listen again on a new channel (the
  // exclusive queue went with the old one), a second later, for the connection's life.
  let connectionClosed = false;
  connection.once('closed', () => {
    connectionClosed = true;
  });
  channel.once('close', () => {
    if (connectionClosed) return;
    setTimeout(() => {
      if (connectionClosed) return;
      listenForOrders(connection, queue, onOrder, log).catch((err: unknown) =>
        log.warn({ err }, 'cannot listen on the control exchange again'),
      );
    }, 1_000).unref();
  });
  const exchange = controlExchangeName(queue);
  await connection.step('declaring the control exchange', async () => {
    await channel.assertExchange(exchange, 'fanout', { durable: true });
    const own = await channel.assertQueue('', { exclusive: true, autoDelete: true, durable: false });
    await channel.bindQueue(own.queue, exchange, '');
    await channel.consume(
      own.queue,
      (message) => {
        if (message === null) return;
        const order = readOrder(message);
        if (order === undefined) {
          log.warn('a control message that is not an order: ignored');
          return;
        }
        onOrder(order, channel);
      },
      { noAck: true },
    );
  });
}
