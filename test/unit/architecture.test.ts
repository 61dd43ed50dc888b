// The layers of src/ (README "The map"): each folder may import only the folders listed
// for it, type-only imports included, so the directions hold as the code grows.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const SRC = fileURLToPath(new URL('../../src/', import.meta.url));

/** What each layer may import, besides itself, errors.ts and util/ (which everything may). */
const MAY_IMPORT: Record<string, readonly string[]> = {
  cli: ['service', 'config', 'client', 'amqp', 'worker', 'http', 'telemetry'],
  config: ['amqp'],
  service: ['config', 'dispatch', 'amqp', 'pool', 'http', 'metrics', 'telemetry'],
  dispatch: ['amqp', 'pool', 'metrics', 'ipc', 'telemetry'],
  amqp: [],
  pool: ['ipc'],
  ipc: [],
  worker: ['ipc', 'telemetry'],
  telemetry: [],
  http: ['pool'],
  metrics: [],
  client: ['amqp'],
  util: [],
  'errors.ts': [],
  'index.ts': ['client', 'config', 'service', 'worker'],
};

function layerOf(file: string): string {
  return relative(SRC, file).split('/')[0] as string;
}

function sources(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => join(dir, f));
}

/** Every relative import of a file, `import type` and `export ... from` included. */
function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const specs = [...text.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+'(\.[^']+)'/gm)].map(
    (m) => m[1] as string,
  );
  specs.push(...[...text.matchAll(/^\s*import\s+'(\.[^']+)'/gm)].map((m) => m[1] as string));
  return specs.map((s) => resolve(dirname(file), s));
}

export function violations(): string[] {
  const found: string[] = [];
  for (const file of sources(SRC)) {
    const from = layerOf(file);
    const allowed = MAY_IMPORT[from];
    if (allowed === undefined) {
      found.push(`${relative(SRC, file)}: the layer ${from} is not in the map (README "The map")`);
      continue;
    }
    for (const target of importsOf(file)) {
      if (!target.startsWith(SRC)) {
        found.push(`${relative(SRC, file)} imports ${relative(SRC, target)}, outside src/`);
        continue;
      }
      const to = layerOf(target);
      if (to === from || to === 'errors.ts' || to === 'util' || allowed.includes(to)) continue;
      found.push(`${relative(SRC, file)} imports ${relative(SRC, target)} (${from} may not import ${to})`);
    }
  }
  return found;
}

test('every import follows the layer directions', () => {
  assert.deepEqual(violations(), []);
});

test('the directions the README promises hold in the map itself', () => {
  for (const low of ['amqp', 'pool', 'http', 'metrics', 'client'])
    for (const high of ['config', 'cli', 'service'])
      assert.ok(!MAY_IMPORT[low]?.includes(high), `${low} must not import ${high}`);
  for (const forbidden of ['pool', 'amqp', 'service', 'http', 'dispatch'])
    assert.ok(!MAY_IMPORT.worker?.includes(forbidden), `worker must not import ${forbidden}`);
  assert.ok(
    !MAY_IMPORT.pool?.includes('worker') && !MAY_IMPORT.worker?.includes('pool'),
    'pool and worker meet only through ipc',
  );
  assert.deepEqual(MAY_IMPORT.util, []);
});

test("README's map lists exactly the folders of src/", () => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const map = readme.slice(readme.indexOf('### The map'));
  const listed = [...map.matchAll(/^\| `([a-z]+)\/` \|/gm)].map((m) => m[1]).sort();
  const folders = readdirSync(SRC, { withFileTypes: true })
    .filter((d) => d.isDirectory())
    .map((d) => d.name)
    .sort();
  assert.deepEqual(listed, folders);
});

test('the check sees a broken direction (a worker file importing the pool)', () => {
  const text = "import type { Pool } from '../pool/pool.ts';\nimport { x } from './y.ts';";
  const specs = [...text.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+'(\.[^']+)'/gm)].map((m) => m[1]);
  assert.deepEqual(specs, ['../pool/pool.ts', './y.ts']);
});

test('the code cites documents that exist in the repository, and nothing outside it', () => {
  const root = fileURLToPath(new URL('../../', import.meta.url));
  for (const file of sources(SRC)) {
    const text = readFileSync(file, 'utf8');
    assert.doesNotMatch(
      text,
      /SPEC §|\.\.\/shared\//,
      `${relative(SRC, file)} cites a document outside the repository`,
    );
    for (const [, doc] of text.matchAll(/\b(docs\/[\w./-]+\.md)\b/g))
      assert.ok(
        existsSync(join(root, doc as string)),
        `${relative(SRC, file)} cites ${doc}, which does not exist`,
      );
  }
});

test('docs/architecture.md names every file of the pool and the broker side it describes', () => {
  const doc = readFileSync(new URL('../../docs/architecture.md', import.meta.url), 'utf8');
  for (const folder of ['pool', 'amqp'])
    for (const file of readdirSync(join(SRC, folder)))
      assert.ok(doc.includes(`${folder}/${file}`), `docs/architecture.md does not name ${folder}/${file}`);
});
