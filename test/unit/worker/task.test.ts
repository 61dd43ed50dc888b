// The typed form of per-task options: the same options, checked at once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { task } from '../../../src/worker/task.ts';

test('task(options, fn) is fn with its options, checked when it is made', () => {
  const resize = task({ timeout: 120, maxRetries: 5 }, async function resize(path: string) {
    return path;
  });
  assert.deepEqual(resize.options, { timeout: 120, maxRetries: 5 });
  assert.equal(typeof resize, 'function');
  assert.throws(
    () => task({ timeout: -1 }, function slow() {}),
    (err: Error) =>
      err instanceof TypeError && /^task "slow": option timeout must be seconds/.test(err.message),
  );
  assert.throws(
    () => task({ rateLimit: 'fast' as never }, () => {}),
    /^TypeError: task "anonymous": option rateLimit/,
  );
});
