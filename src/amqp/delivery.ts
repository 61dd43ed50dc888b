// What the consumer hands its owner: a delivery with the session that may settle it, and,
// when a session ends, what was acked on it without proof that the ack arrived. Types only,
// shared by the consumer, its sessions and the dispatcher.
import type { ConsumeMessage } from 'amqplib';
import type { ConsumerSession } from './session.ts';

export interface Delivery {
  message: ConsumeMessage;
  /** The session that delivered it: the only one that may settle it. */
  session: ConsumerSession;
}

/**
 * What a session keeps of a delivery it acked until a fence proves the ack arrived: what
 * the owner will know a redelivery of it by (ConsumerOptions.ackMemo).
 */
export type AckMemo = string | Buffer;

/** A session that ended, as the owner of its deliveries hears of it. */
export interface LostSession {
  session: ConsumerSession;
  /**
   * Deliveries acked on it whose acks no fence proved to have arrived, as the owner's
   * ackMemo kept them: the broker may give them again, and those must be acked without
   * running again.
   */
  uncertain: AckMemo[];
}
