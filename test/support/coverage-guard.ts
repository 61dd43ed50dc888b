// Loaded into every test file's process by `npm test` (--import). Node's coverage report
// gives up entirely, and fails the run, on one unreadable file in NODE_V8_COVERAGE. A
// process the suite kills with SIGKILL while it is exiting (a test's clean-up killing a
// service that was already on its way out) leaves such a file: V8 writes the file in
// place at exit, and the kill cuts it short. That process's coverage is lost either way;
// this drops its file, so that the rest of the run is still measured.
//
// Only files whose writer is gone are touched: a process still alive may be writing.
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';

const COVERAGE_FILE = /^coverage-(\d+)-\d{13}-\d+\.json$/;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function readable(path: string): boolean {
  try {
    JSON.parse(readFileSync(path, 'utf8'));
    return true;
  } catch {
    return false;
  }
}

process.on('exit', () => {
  const dir = process.env.NODE_V8_COVERAGE;
  if (dir === undefined) return;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  for (const name of names) {
    const pid = Number(COVERAGE_FILE.exec(name)?.[1]);
    if (!Number.isInteger(pid) || pid === process.pid || alive(pid)) continue;
    const path = join(dir, name);
    if (readable(path)) continue;
    rmSync(path, { force: true });
    process.stderr.write(
      `coverage: dropped the unreadable coverage file of pid ${pid}, killed while it exited\n`,
    );
  }
});
