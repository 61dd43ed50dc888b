// How much memory this process may use: the container's limit (cgroup v2, then v1) when
// there is one, else the machine's. Options derived from memory (--max-workers) read it.
import { readFileSync } from 'node:fs';
import { totalmem } from 'node:os';

function readLimit(path: string): number | undefined {
  try {
    const text = readFileSync(path, 'utf8').trim();
    const n = Number(text);
    return /^\d+$/.test(text) && Number.isSafeInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

export function memoryLimitBytes(): number {
  const total = totalmem();
  const cgroup =
    readLimit('/sys/fs/cgroup/memory.max') ?? readLimit('/sys/fs/cgroup/memory/memory.limit_in_bytes');
  return cgroup !== undefined && cgroup < total ? cgroup : total;
}
