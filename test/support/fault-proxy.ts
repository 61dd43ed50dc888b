// A fault-injecting TCP proxy on 127.0.0.1 for tests, in the spirit of Shopify toxiproxy's
// toxics: put it between the code under test and the broker, then partition, reset, cut
// mid-frame, slow down or refuse the link at a chosen moment. rabbitmqctl (broker-faults.ts)
// can only close connections politely or stop the broker; the network failures that hurt
// in production (silence, half-written frames, RSTs, slowness) need a proxy.
//
// Every socket has a no-op 'error' listener: ECONNRESET and friends are the point of the
// exercise and must never become unhandled 'error' events that crash the test process.
import net, { type Socket } from 'node:net';

export type Direction = 'upstream' | 'downstream';

export interface FaultProxy {
  /** Listen port on 127.0.0.1. */
  readonly port: number;
  /** The same URL with host 127.0.0.1 and the proxy's port, so a client connects through the proxy. */
  readonly url: (amqpUrl: string) => string;
  /**
   * Forward normally (the default state): clears blackhole, refuse, latency and pending cuts.
   * Connections swallowed by a blackhole stay dead-silent: a real partition loses those bytes,
   * and the two ends disagree about the stream from then on; only new connections work.
   */
  heal(): void;
  /**
   * Partition: existing connections stop forwarding in both directions (bytes, FINs and closes
   * are swallowed; both sockets stay open, so each end only learns of it by its own timeouts or
   * heartbeats). New TCP connections are accepted but nothing is ever forwarded or answered on
   * them, and the target never sees them ("SYN answered, handshake never is").
   */
  blackhole(): void;
  /**
   * One-way silence on the connections open now: from then on nothing passes in
   * `direction` ('upstream': the client's writes, such as its acks, never reach the server;
   * 'downstream': the server's never reach the client), while the other direction still
   * flows. Like a partition, the swallowed bytes are lost for good; new connections work.
   */
  silence(direction: Direction): void;
  /** Destroy every open connection now, both sides, with an RST where possible (resetAndDestroy). New connections still work unless another fault is set. */
  resetAll(): void;
  /**
   * Cut each existing connection once `bytes` more bytes have passed in `direction` ('upstream'
   * client->server, 'downstream' server->client): forwards exactly that many bytes, then
   * destroys both sides, so a frame can be cut in the middle. 0 cuts at once. New connections are
   * not affected.
   */
  cutAfter(bytes: number, direction: Direction): void;
  /** Delay every chunk by `ms` in both directions, on existing and new connections (order is kept). 0 removes it. */
  latency(ms: number): void;
  /** Refuse new connections: each accepted socket is reset at once (the client sees ECONNRESET or a close; the target never sees it). */
  refuse(): void;
  /** Open proxied connections now (accepted client sockets or their upstream still open, swallowed ones included). */
  readonly connections: number;
  /**
   * How long since the proxy last forwarded a byte, either way: a test that must not cut
   * what the code under test has just written (an ack) waits for a quiet link first.
   */
  readonly quietForMs: number;
  /** Destroys every connection and timer and closes the listener. */
  close(): Promise<void>;
}

/** What waits in one direction: a chunk, the source's FIN ('end') or the source's close. */
type Payload = { kind: 'data'; chunk: Buffer } | { kind: 'end' } | { kind: 'close' };
type Item = Payload & { due: number };

interface Pipe {
  from: Socket;
  to: Socket;
  queue: Item[];
  timer: NodeJS.Timeout | undefined;
  /** Due time of the last queued item: a later chunk never overtakes an earlier one when latency drops. */
  lastDue: number;
  /** Bytes still allowed before the cut, or undefined when no cut is set. */
  cut: number | undefined;
  /** Swallows everything from now on (a one-way silence). */
  silenced: boolean;
}

interface Conn {
  client: Socket;
  upstream: Socket | undefined;
  /**
   * Set by a blackhole (or a cut) and never cleared: nothing more is forwarded, and the bytes
   * a partition swallowed are lost for good.
   */
  partitioned: boolean;
  pipes: Pipe[];
}

const alive = (s: Socket | undefined): boolean => s !== undefined && !s.destroyed;

/** Destroys with an RST when the socket is connected (what a crashed peer or a middlebox sends). */
function reset(s: Socket | undefined): void {
  if (s === undefined || s.destroyed) return;
  if (s.connecting || s.pending) s.destroy();
  else s.resetAndDestroy();
}

export async function startFaultProxy(target: { host: string; port: number }): Promise<FaultProxy> {
  const conns = new Set<Conn>();
  let blackholed = false;
  let refusing = false;
  let latencyMs = 0;
  let closed = false;
  let lastForwardedAt = performance.now();

  const stop = (pipe: Pipe) => {
    clearTimeout(pipe.timer);
    pipe.timer = undefined;
    pipe.queue.length = 0;
  };

  const kill = (conn: Conn) => {
    for (const pipe of conn.pipes) stop(pipe);
    conn.client.destroy();
    conn.upstream?.destroy();
  };

  const deliver = (conn: Conn, pipe: Pipe, item: Item) => {
    const { from, to } = pipe;
    if (item.kind === 'end') {
      if (!to.writableEnded) to.end();
      return;
    }
    if (item.kind === 'close') {
      // The source is gone both ways: finish writing what is queued, then close this side too.
      to.end(() => to.destroy());
      return;
    }
    let chunk = item.chunk;
    let cutNow = false;
    if (pipe.cut !== undefined) {
      if (chunk.length >= pipe.cut) {
        chunk = chunk.subarray(0, pipe.cut);
        cutNow = true;
      } else pipe.cut -= chunk.length;
    }
    if (cutNow) {
      // Nothing more may pass, not even data that arrives before the sockets are gone.
      conn.partitioned = true;
      for (const p of conn.pipes) stop(p);
      // Destroy only once the last allowed byte is handed to the kernel, or it could be lost.
      to.write(chunk, () => kill(conn));
      return;
    }
    lastForwardedAt = performance.now();
    // Backpressure: a slow reader pauses the writer instead of buffering without bound.
    if (!to.write(chunk) && !from.isPaused()) {
      from.pause();
      to.once('drain', () => from.resume());
    }
  };

  const pump = (conn: Conn, pipe: Pipe) => {
    clearTimeout(pipe.timer);
    pipe.timer = undefined;
    for (;;) {
      const item = pipe.queue[0];
      if (item === undefined || conn.partitioned) return;
      const wait = item.due - performance.now();
      if (wait > 0) {
        // Timers may fire a little early; re-checking the clock keeps the delay at least `ms`.
        pipe.timer = setTimeout(() => pump(conn, pipe), Math.ceil(wait));
        pipe.timer.unref();
        return;
      }
      pipe.queue.shift();
      deliver(conn, pipe, item);
    }
  };

  const enqueue = (conn: Conn, pipe: Pipe, payload: Payload) => {
    if (conn.partitioned || pipe.silenced) return; // swallowed: lost, not delayed
    const due = Math.max(performance.now() + latencyMs, pipe.lastDue);
    pipe.lastDue = due;
    pipe.queue.push({ ...payload, due });
    if (pipe.timer === undefined) pump(conn, pipe);
  };

  const wire = (conn: Conn, from: Socket, to: Socket): Pipe => {
    const pipe: Pipe = { from, to, queue: [], timer: undefined, lastDue: 0, cut: undefined, silenced: false };
    from.on('data', (chunk: Buffer) => enqueue(conn, pipe, { kind: 'data', chunk }));
    from.on('end', () => enqueue(conn, pipe, { kind: 'end' }));
    from.on('close', (hadError) => {
      if (conn.partitioned || pipe.silenced) return; // the other end must not learn of it through us
      if (hadError) {
        // An RST or a failed connect: pass it on at once, as a reset, whatever is queued.
        stop(pipe);
        reset(to);
      } else enqueue(conn, pipe, { kind: 'close' });
    });
    return pipe;
  };

  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    client.on('error', () => {});
    if (closed || refusing) {
      reset(client);
      return;
    }
    const conn: Conn = { client, upstream: undefined, partitioned: blackholed, pipes: [] };
    conns.add(conn);
    const forget = () => {
      if (!alive(conn.client) && !alive(conn.upstream)) {
        for (const pipe of conn.pipes) stop(pipe);
        conns.delete(conn);
      }
    };
    client.on('close', forget);
    if (conn.partitioned) {
      client.resume(); // read and drop, so the client's writes never block on a full window
      return;
    }
    // allowHalfOpen on both sides: a FIN is forwarded as a FIN, in order with the data before it.
    const upstream = net.connect({ host: target.host, port: target.port, allowHalfOpen: true });
    upstream.on('error', () => {});
    upstream.on('close', forget);
    conn.upstream = upstream;
    conn.pipes = [wire(conn, client, upstream), wire(conn, upstream, client)];
  });
  server.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('fault proxy: no TCP address');
  const port = address.port;

  return {
    port,
    url(amqpUrl: string): string {
      const u = new URL(amqpUrl);
      u.hostname = '127.0.0.1';
      u.port = String(port);
      return u.toString();
    },
    heal() {
      blackholed = false;
      refusing = false;
      latencyMs = 0;
      for (const conn of conns) for (const pipe of conn.pipes) pipe.cut = undefined;
    },
    blackhole() {
      blackholed = true;
      for (const conn of conns) {
        conn.partitioned = true;
        for (const pipe of conn.pipes) {
          stop(pipe); // delayed bytes not yet delivered are lost too
          pipe.from.resume(); // keep reading and dropping, even if backpressure had paused it
        }
      }
    },
    silence(direction: Direction) {
      for (const conn of conns) {
        const pipe = conn.pipes[direction === 'upstream' ? 0 : 1];
        if (pipe === undefined) continue;
        pipe.silenced = true;
        stop(pipe);
        pipe.from.resume(); // keep reading and dropping, even if backpressure had paused it
      }
    },
    resetAll() {
      for (const conn of conns) {
        for (const pipe of conn.pipes) stop(pipe);
        reset(conn.client);
        reset(conn.upstream);
      }
    },
    cutAfter(bytes: number, direction: Direction) {
      if (!Number.isInteger(bytes) || bytes < 0) throw new RangeError(`cutAfter: bad byte count ${bytes}`);
      for (const conn of [...conns]) {
        if (conn.partitioned) continue;
        const pipe = conn.pipes[direction === 'upstream' ? 0 : 1];
        if (pipe === undefined) continue;
        if (bytes === 0) kill(conn);
        else pipe.cut = bytes;
      }
    },
    latency(ms: number) {
      if (!(ms >= 0)) throw new RangeError(`latency: bad delay ${ms}`);
      latencyMs = ms;
    },
    refuse() {
      refusing = true;
    },
    get connections() {
      return conns.size;
    },
    get quietForMs() {
      return performance.now() - lastForwardedAt;
    },
    async close() {
      closed = true;
      const closing = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const conn of conns) kill(conn);
      conns.clear();
      await closing;
    },
  };
}

/**
 * Starts a proxy to the host and port of `amqpUrl` (5672, or 5671 for amqps, when it names
 * none), closed at teardown. Connect with `proxy.url(amqpUrl)`. Through an amqps URL the TLS
 * server name becomes 127.0.0.1, so certificate checks need their own servername.
 */
export async function proxyFor(
  t: { after: (fn: () => unknown) => void },
  amqpUrl: string,
): Promise<FaultProxy> {
  const u = new URL(amqpUrl);
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1') || 'localhost';
  const port = u.port === '' ? (u.protocol === 'amqps:' ? 5671 : 5672) : Number(u.port);
  const proxy = await startFaultProxy({ host, port });
  t.after(() => proxy.close());
  return proxy;
}
