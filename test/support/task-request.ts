// A task request as the dispatcher makes one, for the pool's tests: unit tests (no broker)
// and the integration tests (through helpers.ts) build theirs here.
import type { TaskRequest } from '../../src/pool/job.ts';

/** `func(...args)`, a first delivery, its result wanted; `more` overrides any field. */
export function taskRequest(
  func: string,
  args: unknown[] = [],
  more: Partial<TaskRequest> = {},
): TaskRequest {
  return {
    func,
    args,
    kwargs: undefined,
    messageId: undefined,
    redelivered: false,
    attempt: 1,
    wantResult: true,
    ...more,
  };
}
