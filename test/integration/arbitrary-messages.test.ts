// Property: whatever arrives — any bytes, any JSON, any properties — each message ends in
// exactly one outcome, and the master is not disturbed.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Options } from 'amqplib';
import fc from 'fast-check';
import { broker, startService, testConfig, waitFor } from '../support/helpers.ts';

const funcName = fc.oneof(
  fc.constantFrom('add', 'echo', 'fail', 'throwString', 'context', 'unserializable', 'crash'),
  fc.constantFrom('constructor', '__proto__', 'default', 'toString', 'add.call', 'hasOwnProperty', ''),
  fc.string(),
);

const jsonBody = fc.record(
  {
    func: fc.oneof(funcName, fc.anything()),
    args: fc.oneof(fc.array(fc.jsonValue(), { maxLength: 4 }), fc.jsonValue()),
    kwargs: fc.oneof(fc.dictionary(fc.string(), fc.jsonValue(), { maxKeys: 3 }), fc.jsonValue()),
  },
  { requiredKeys: [] },
);

/** The body size limit of the service under test: bodies are drawn up to it and past it. */
const MAX_BYTES = 64 * 1024;

/** Arrays (or objects) nested `depth` deep around `inner`, as text: cheap at any depth. */
function nested(depth: number, asObject: boolean, inner: string): string {
  return asObject
    ? `${'{"k":'.repeat(depth)}${inner}${'}'.repeat(depth)}`
    : `${'['.repeat(depth)}${inner}${']'.repeat(depth)}`;
}

const hostileBody = fc.oneof(
  // Deep nesting inside args or kwargs, below, at and far past the limit of 64 levels.
  fc
    .record({
      func: fc.constantFrom('add', 'echo'),
      depth: fc.oneof(fc.integer({ min: 1, max: 70 }), fc.integer({ min: 1_000, max: 20_000 })),
      asObject: fc.boolean(),
      where: fc.constantFrom('args', 'kwargs'),
    })
    .map(({ func, depth, asObject, where }) =>
      Buffer.from(
        where === 'args'
          ? `{"func":"${func}","args":[${nested(depth, asObject, '1')}]}`
          : `{"func":"${func}","kwargs":{"a":${nested(depth, asObject, '1')}}}`,
      ),
    ),
  // Wide: many keys or elements, up to and past the size limit.
  fc
    .integer({ min: 1, max: 12_000 })
    .map((n) =>
      Buffer.from(
        JSON.stringify({ func: 'echo', args: Array.from({ length: n }, (_, i) => ({ [`k${i}`]: i })) }),
      ),
    ),
  // Every JSON type in args and kwargs, with __proto__ and constructor keys.
  fc
    .record({
      args: fc.array(fc.jsonValue({ maxDepth: 4 }), { maxLength: 6 }),
      kwargs: fc.dictionary(
        fc.constantFrom('__proto__', 'constructor', 'prototype', 'toString', 'a'),
        fc.jsonValue(),
        {
          maxKeys: 4,
        },
      ),
    })
    .map(({ args, kwargs }) => {
      // JSON.stringify drops an own __proto__ key set by assignment; write it as text.
      const kw = Object.entries(kwargs)
        .map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`)
        .join(',');
      return Buffer.from(
        `{"func":"echo","args":${JSON.stringify(args)},"kwargs":{${kw},"__proto__":{"polluted":true}}}`,
      );
    }),
  // A string right at the limit, and just over it.
  fc.integer({ min: -64, max: 64 }).map((delta) => {
    const head = '{"func":"echo","args":["';
    const tail = '"]}';
    return Buffer.from(head + 'x'.repeat(Math.max(0, MAX_BYTES + delta - head.length - tail.length)) + tail);
  }),
);

const body = fc.oneof(
  jsonBody.map((b) => Buffer.from(JSON.stringify(b) ?? 'null')),
  fc.jsonValue().map((v) => Buffer.from(JSON.stringify(v) ?? 'null')),
  fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
  fc.string().map((s) => Buffer.from(s)),
  hostileBody,
);

const properties: fc.Arbitrary<Options.Publish> = fc.record(
  {
    messageId: fc.string({ maxLength: 20 }),
    correlationId: fc.string({ maxLength: 20 }),
    contentType: fc.constantFrom('application/json', 'text/plain', 'application/octet-stream'),
    priority: fc.integer({ min: 0, max: 9 }),
    headers: fc.dictionary(
      fc.string({ minLength: 1, maxLength: 10 }).filter((k) => !k.startsWith('x-')),
      fc.oneof(fc.string({ maxLength: 10 }), fc.integer(), fc.boolean()),
      { maxKeys: 3 },
    ),
    timestamp: fc.integer({ min: 0, max: 2 ** 31 }),
    type: fc.string({ maxLength: 10 }),
    appId: fc.string({ maxLength: 10 }),
  },
  { requiredKeys: [] },
);

test('arbitrary bodies and properties each yield exactly one outcome and never disturb the master', async (t) => {
  const b = await broker(t);
  const service = await startService(t, b, testConfig(t, { workers: 2, maxMessageBytes: MAX_BYTES }));
  const q = service.config.queue;
  const samples = fc.sample(fc.tuple(body, properties), { numRuns: 200, seed: 20261130 });
  for (const [content, props] of samples) await b.send(q, content, props);
  const total = async () => {
    const text = await service.metrics.registry.metrics();
    return text
      .split('\n')
      .filter((l) => l.startsWith('amqp_concurrency_tasks_total{'))
      .reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);
  };
  await waitFor('an outcome for every message', async () => (await total()) >= samples.length, 60_000);
  assert.equal(await total(), samples.length, 'exactly one outcome each');
  assert.equal(await b.count(q), 0);
  const dead = await b.drainQueue(`${q}.dead`);
  const text = await service.metrics.registry.metrics();
  const succeeded = text
    .split('\n')
    .filter((l) => /^amqp_concurrency_tasks_total\{.*outcome="succeeded"\}/.test(l))
    .reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);
  assert.equal(
    dead.length + succeeded,
    samples.length,
    'every message not succeeded is in the dead-letter queue',
  );
  for (const m of dead) assert.ok(typeof m.properties.headers?.['x-error-kind'] === 'string');
  // Nothing reached Object.prototype through a __proto__ key.
  assert.equal(({} as { polluted?: unknown }).polluted, undefined);
  await waitFor('the pool to be whole', () => service.health().status === 'ok');
  const replies = await b.channel.assertQueue('', { exclusive: true });
  await b.send(q, { func: 'add', args: [20, 22] }, { replyTo: replies.queue });
  const [reply] = await b.take(replies.queue, 1);
  assert.deepEqual(JSON.parse(String(reply?.content)), { ok: true, result: 42 });
});
