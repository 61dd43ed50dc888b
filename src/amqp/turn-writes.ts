// One socket write for the frames a turn of the event loop sends on a connection.
// amqplib hands each frame (a publish, an ack) to the socket with a write of its own, from
// the setImmediate of its frame multiplexer: the ten replies of one read of a worker's
// results were ten write syscalls, and each a wake-up of the broker's reader. Corked from
// the first frame of a turn until just after that multiplexer has run, the socket sends
// them as one writev (docs/benchmarks.md, "thirteenth pass").
//
// Nothing waits for it: no timer, no window. The socket is uncorked in the check phase
// that writes the frames, right after the multiplexer's own setImmediate, which amqplib
// schedules from its channel buffer's 'readable' event, a nextTick queued when the frame
// is written: ours is queued from a nextTick queued after that one, so it runs after it.
// Frames written inside a check phase (an ack flush run by setImmediate) go out in the
// next iteration's check phase, as they did without the cork, and the poll phase between
// does not block while immediates are pending. The cork holds only what reaches the
// socket meanwhile (a heartbeat), in order. Were amqplib ever to write sooner, the frames
// would simply go out corked until our setImmediate.
import type { Socket } from 'node:net';
import type { Channel } from 'amqplib';

/** Sockets corked for the current turn: one cork and one uncork per turn, however many frames. */
const corked = new WeakSet<Socket>();

/** The socket under an amqplib channel (amqplib keeps it as its connection's `stream`). */
function socketOf(channel: Channel): Socket | undefined {
  return (channel as unknown as { connection?: { stream?: Socket } }).connection?.stream;
}

/**
 * Call right after writing frames on `channel`: they, and any other frame written on its
 * connection in this turn, leave in one write at the end of the turn.
 */
export function writeTogetherThisTurn(channel: Channel): void {
  const socket = socketOf(channel);
  if (socket === undefined || socket.destroyed || corked.has(socket)) return;
  corked.add(socket);
  socket.cork();
  process.nextTick(() =>
    setImmediate(() => {
      corked.delete(socket);
      socket.uncork();
    }),
  );
}
