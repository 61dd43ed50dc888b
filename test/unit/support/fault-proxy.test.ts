// The fault proxy against a tiny echo server (no broker): each fault does what it says,
// and close() leaves nothing behind that would keep the test process alive.
import assert from 'node:assert/strict';
import net, { type Socket } from 'node:net';
import { test } from 'node:test';
import { type FaultProxy, startFaultProxy } from '../../support/fault-proxy.ts';

type T = { after: (fn: () => unknown) => void };

async function until(what: string, check: () => boolean, timeoutMs = 5_000): Promise<void> {
  const start = performance.now();
  while (!check()) {
    if (performance.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** An echo server that records what each accepted connection received, in accept order. */
async function echoServer(t: T) {
  const received: string[] = [];
  const open = new Set<Socket>();
  const server = net.createServer((s) => {
    const i = received.push('') - 1;
    open.add(s);
    s.on('error', () => {});
    s.on('close', () => open.delete(s));
    s.on('data', (d) => {
      received[i] += d.toString();
      s.write(d);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(async () => {
    for (const s of open) s.destroy();
    await new Promise((r) => server.close(r));
  });
  const address = server.address() as net.AddressInfo;
  return { port: address.port, received, open };
}

async function setup(t: T) {
  const echo = await echoServer(t);
  const proxy = await startFaultProxy({ host: '127.0.0.1', port: echo.port });
  t.after(() => proxy.close());
  return { echo, proxy };
}

interface Client {
  socket: Socket;
  data: string;
  connected: boolean;
  closed: boolean;
  error: NodeJS.ErrnoException | undefined;
}

function dial(t: T, port: number): Client {
  const socket = net.connect(port, '127.0.0.1');
  const c: Client = { socket, data: '', connected: false, closed: false, error: undefined };
  socket.on('connect', () => (c.connected = true));
  socket.on('data', (d) => (c.data += d.toString()));
  socket.on('error', (e) => (c.error = e));
  socket.on('close', () => (c.closed = true));
  t.after(() => socket.destroy());
  return c;
}

/** Writes `text` and waits for its echo; afterwards the proxy has surely accepted the connection. */
async function roundtrip(c: Client, text: string): Promise<void> {
  const before = c.data.length;
  c.socket.write(text);
  await until(`echo of ${text}`, () => c.data.length >= before + text.length);
  assert.equal(c.data.slice(before), text);
}

async function connected(t: T, proxy: FaultProxy): Promise<Client> {
  const c = dial(t, proxy.port);
  await roundtrip(c, 'hi');
  return c;
}

test('forwards both ways, large writes included, and rewrites an AMQP URL', {
  timeout: 10_000,
}, async (t) => {
  const { echo, proxy } = await setup(t);
  const c = await connected(t, proxy);
  const big = 'x'.repeat(1 << 20);
  await roundtrip(c, big);
  assert.equal(echo.received[0], `hi${big}`);
  assert.equal(proxy.connections, 1);
  assert.equal(proxy.url('amqp://u:p@localhost:5672/vh'), `amqp://u:p@127.0.0.1:${proxy.port}/vh`);
});

test('blackhole swallows old connections for good; new ones connect but hear nothing until healed', {
  timeout: 10_000,
}, async (t) => {
  const { echo, proxy } = await setup(t);
  const old = await connected(t, proxy);
  proxy.blackhole();
  old.socket.write('lost-1');
  const during = dial(t, proxy.port);
  await until('the proxy accepting the new connection', () => during.connected && proxy.connections === 2);
  during.socket.write('lost-2');
  proxy.heal();
  const after = await connected(t, proxy);
  old.socket.write('lost-3');
  during.socket.write('lost-4');
  // Proving that nothing arrives needs a fixed wait: 300 ms is many loopback round trips
  // (the echo above took well under 1 ms), so anything forwarded would have shown up.
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(old.data, 'hi');
  assert.equal(during.data, '');
  assert.equal(old.closed || during.closed, false, 'a partition keeps sockets open');
  assert.deepEqual(
    echo.received,
    ['hi', 'hi'],
    'the target saw neither swallowed bytes nor the new connection',
  );
  assert.equal(after.data, 'hi');
});

test('resetAll resets every connection; new ones still work', { timeout: 10_000 }, async (t) => {
  const { echo, proxy } = await setup(t);
  const c = await connected(t, proxy);
  proxy.resetAll();
  await until('the client closed', () => c.closed);
  assert.equal(c.error?.code, 'ECONNRESET');
  await until('the target side closed', () => echo.open.size === 0 && proxy.connections === 0);
  await connected(t, proxy);
});

test('cutAfter forwards exactly N bytes in the given direction, then closes both sides', {
  timeout: 10_000,
}, async (t) => {
  const { echo, proxy } = await setup(t);
  const down = await connected(t, proxy);
  proxy.cutAfter(4, 'downstream');
  down.socket.write('0123456789');
  await until('the client closed', () => down.closed);
  assert.equal(down.data, 'hi0123');
  await until('the target received all', () => echo.received[0] === 'hi0123456789');

  const up = await connected(t, proxy);
  proxy.cutAfter(4, 'upstream');
  up.socket.write('0123456789');
  await until('both sides closed', () => up.closed && echo.open.size === 0);
  assert.equal(echo.received[1], 'hi0123');

  const fresh = await connected(t, proxy); // the cut was for existing connections only
  await roundtrip(fresh, '0123456789');
});

test('latency delays each direction by at least N ms, in order', { timeout: 10_000 }, async (t) => {
  const { proxy } = await setup(t);
  const c = await connected(t, proxy);
  proxy.latency(150);
  const start = performance.now();
  c.socket.write('a');
  c.socket.write('b');
  await until('both echoes', () => c.data.length === 4);
  assert.ok(performance.now() - start >= 300, `round trip took ${performance.now() - start} ms`);
  assert.equal(c.data, 'hiab');
  proxy.heal();
  await roundtrip(c, 'fast');
});

test('refuse closes new connections at once; heal lets them through', { timeout: 10_000 }, async (t) => {
  const { echo, proxy } = await setup(t);
  proxy.refuse();
  const c = dial(t, proxy.port);
  c.socket.write('hello');
  await until('the client closed', () => c.closed);
  assert.equal(c.data, '');
  assert.equal(echo.received.length, 0, 'the target never saw it');
  proxy.heal();
  await connected(t, proxy);
});

test('close() destroys everything and leaves no handle open', { timeout: 10_000 }, async (t) => {
  const echo = await echoServer(t);
  const handles = () =>
    process.getActiveResourcesInfo().filter((r) => r.startsWith('TCP') || r === 'Timeout').length;
  const baseline = handles();
  const proxy = await startFaultProxy({ host: '127.0.0.1', port: echo.port });
  const c = await connected(t, proxy);
  proxy.latency(10_000);
  c.socket.write('in flight'); // a delayed chunk whose timer close() must clear
  await proxy.close();
  assert.equal(proxy.connections, 0);
  await until('the client and the target side closed', () => c.closed && echo.open.size === 0);
  const refused = dial(t, proxy.port);
  await until('the refused dial closed', () => refused.closed);
  assert.equal(refused.error?.code, 'ECONNREFUSED');
  await until('handles back to the baseline', () => handles() <= baseline);
});

test('silence: one direction goes quiet on open connections, the other still flows, new ones work', async (t) => {
  const { echo, proxy } = await setup(t);
  const up = dial(t, proxy.port);
  await until('connected', () => up.connected && echo.received.length === 1);
  proxy.silence('upstream');
  up.socket.write('lost');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(echo.received[0], '', "the client's bytes never reach the server");
  // The server can still speak: its bytes come through.
  for (const s of echo.open) s.write('hello');
  await until('the server heard downstream', () => up.data === 'hello');
  const down = dial(t, proxy.port);
  await until('a new connection', () => down.connected && echo.received.length === 2);
  proxy.silence('downstream');
  down.socket.write('ping');
  await until('the server got it', () => echo.received[1] === 'ping');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(down.data, '', 'its echo is swallowed on the way back');
  const fresh = dial(t, proxy.port);
  fresh.socket.write('again');
  await until('a new connection works', () => fresh.data === 'again');
});
