// A folder of this user's own for state kept between runs (the crash journal, the replay
// journal): in a shared /tmp, another user could have made it first, to read or plant
// entries.
import { lstatSync, mkdirSync } from 'node:fs';

/**
 * Makes `dir` a private folder: created with mode 0700, and refused (with
 * the reason) when it is not a folder of ours that only we can read: in a shared /tmp,
 * another user could have made it first, to read or plant entries.
 */
export function privateFolder(dir: string): string | undefined {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const stat = lstatSync(dir);
    if (!stat.isDirectory()) return `${dir} is not a folder`;
    const uid = process.getuid?.();
    if (uid !== undefined && stat.uid !== uid) return `${dir} belongs to another user (uid ${stat.uid})`;
    if ((stat.mode & 0o077) !== 0)
      return `${dir} can be read or written by others (mode ${(stat.mode & 0o777).toString(8)})`;
    return undefined;
  } catch (err) {
    return `${dir} cannot be made: ${(err as Error).message}`;
  }
}
