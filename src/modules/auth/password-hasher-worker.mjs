// One thread of PasswordHasher's pool (password-hasher.ts). Plain JavaScript that imports nothing of
// the service's: it loads the same way under tsx (dev), vitest and `node dist/server.js` (the build
// copies it beside the compiled hasher, see scripts/copy-assets.mjs), with no TypeScript loader in
// the worker.
import { readlinkSync } from 'node:fs';
import { getPriority, setPriority } from 'node:os';
import { parentPort } from 'node:worker_threads';
import bcrypt from 'bcrypt';

/** The lowest priority: this thread runs only on CPU time that the event loop does not want. */
const LOWEST_PRIORITY = 19;

/**
 * Lowers this thread's own priority and answers its id and resulting nice value. On Linux the nice
 * value belongs to each thread, and setpriority() given a thread id changes that thread alone;
 * `/proc/thread-self` reads `<pid>/task/<tid>`. Elsewhere there is no thread id to give it (macOS and
 * Windows take a process id, and lowering the process would lower the event loop with it), so the step
 * is skipped silently, as it is where /proc is not mounted: the thread keeps the normal priority, and
 * hashing competes with the event loop as it did on libuv's pool, still off the event loop's thread.
 */
function lowerOwnPriority() {
  try {
    const threadId = Number(readlinkSync('/proc/thread-self').split('/').pop());
    setPriority(threadId, LOWEST_PRIORITY);
    return { threadId, nice: getPriority(threadId) };
  } catch {
    return {};
  }
}

parentPort.postMessage({ ready: lowerOwnPriority() });

// One job at a time: the synchronous API hashes on this (low-priority) thread itself, not on libuv's
// pool, whose threads run at the event loop's priority.
parentPort.on('message', (job) => {
  try {
    const result =
      job.op === 'hash' ? bcrypt.hashSync(job.password, job.rounds) : bcrypt.compareSync(job.password, job.hash);
    parentPort.postMessage({ result });
  } catch (error) {
    parentPort.postMessage({ error: error instanceof Error ? error.message : String(error) });
  }
});
