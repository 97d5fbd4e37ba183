import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * Vitest's global setup: one temporary folder for the whole run, removed at its end. TMPDIR points
 * there, so every folder the tests make under the system's temporary folder (data folders, PGlite
 * databases, uploads, the data folders of the servers they spawn) goes in it. Left to each test to
 * remove its own, a run of the suite left about 300 folders and 300 MB behind in /tmp.
 */
export default function setup(): () => void {
  const { TMPDIR } = process.env;
  const root = mkdtempSync(join(tmpdir(), 'chatbot-tests-'));
  // As open as /tmp itself: tests make folders here as PostgreSQL's own user too (postgres-server.ts).
  chmodSync(root, 0o1777);
  process.env.TMPDIR = root;
  return () => {
    // As it was: in watch mode the setup runs again in this process when vitest restarts.
    if (TMPDIR === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = TMPDIR;
    rmSync(root, { recursive: true, force: true, maxRetries: 3 });
  };
}
