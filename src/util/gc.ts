// A full garbage collection, on request. V8 collects only when it allocates: a master that
// went idle after a burst of large bodies (each one in memory as bytes, text, parsed value
// and IPC frame) would keep hundreds of megabytes of garbage, and its RSS with it, until
// the next load. HeldBytes asks for one collection a second after the master falls idle
// after such a burst (dispatch/held-bytes.ts). `node --expose-gc` gives `gc`
// directly; without the flag it is enabled here once, which V8 allows at run time for
// this flag.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let collect: (() => void) | undefined;

export function collectGarbage(): void {
  if (collect === undefined) {
    const exposed = (globalThis as { gc?: () => void }).gc;
    if (exposed !== undefined) collect = exposed;
    else {
      try {
        setFlagsFromString('--expose-gc');
        collect = runInNewContext('gc') as () => void;
      } catch {
        collect = () => {};
      }
    }
  }
  collect();
}
