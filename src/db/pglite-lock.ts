import { createHash, randomBytes } from 'node:crypto';
import { existsSync, linkSync, lstatSync, readFileSync, readlinkSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { createConnection, createServer, type Server } from 'node:net';
import { dirname, join } from 'node:path';
import { StartupError } from '../startup-error.js';

export class DatabaseLockedError extends StartupError {
  override name = 'DatabaseLockedError';
}

/** How often a holder touches its lock file, and how long untouched until it counts as left behind. */
const LOCK_REFRESH_MS = 5_000;
const LOCK_STALE_MS = 60_000;
/** How long a holder's beacon may take to answer before it tells nothing (the lock file's age decides). */
const BEACON_TIMEOUT_MS = 1_000;
/** The longest path of a Unix socket (Linux: 108 bytes with the terminating NUL; macOS allows 103). */
const SOCKET_PATH_MAX = 103;
/** A beacon's name, as `lightBeacon` makes it: the only files beside the lock that a takeover removes. */
const BEACON_NAME = /^pglite\.[0-9a-f]{12}\.sock$/;

/** What a lock file says of its holder. */
interface Holder {
  pid: number;
  /** The PID namespace its pid is counted in (see `pidNamespace`). */
  pidNamespace: string;
  /**
   * The kernel it runs on: Linux's boot id, the same in every container of a host and in no other host
   * (see `kernel`). None in a lock written before kernels were named.
   */
  kernel?: string;
  /** The name of its beacon: a Unix socket beside the lock file that it listens on for as long as it lives. */
  beacon?: string;
}

/**
 * Keeps every other process (a server, a backup, a restore) off an embedded database folder until the
 * returned release is called; rejects with DatabaseLockedError while a live process holds it.
 *
 * Whether the holder lives is asked in the surest way open to the asker:
 * - On another kernel (a volume shared over the network), nothing but the lock file's age can tell:
 *   the holder keeps it fresh, and a lock a minute old is left behind.
 * - In the same PID namespace, whether its pid runs.
 * - In another PID namespace of the same kernel (a container, where every server is pid 1), its pid
 *   means nothing here, but its beacon answers: the kernel refuses a connection to a Unix socket once
 *   the process listening on it is gone, killed (SIGKILL, out of memory) or not. A container restarted
 *   after a kill starts at once instead of waiting out the minute; where a beacon cannot be made (a
 *   file system without sockets, a path too long for one), the age decides.
 */
export async function lockPglite(dataDir: string): Promise<() => void> {
  const lockFile = join(dataDir, '..', 'pglite.lock');
  const beacon = await lightBeacon(dirname(lockFile));
  try {
    return await takeLock(lockFile, beacon);
  } catch (error) {
    beacon?.close();
    throw error;
  }
}

interface Beacon {
  name: string;
  close(): void;
}

async function takeLock(lockFile: string, beacon: Beacon | undefined): Promise<() => void> {
  const self: Holder = { pid: process.pid, pidNamespace: pidNamespace(), kernel: kernel(), beacon: beacon?.name };
  for (let attempt = 0; attempt < 3; attempt++) {
    // The beacon listens before the lock names it: no one ever finds a live holder's beacon silent.
    const mine = lockText(self);
    if (createWith(lockFile, mine)) {
      // Its age is what tells a holder on another kernel from one that is gone. Only while it is still
      // ours: a process stalled past the lock's staleness (judged by its age) may have been taken over,
      // and keeping the new holder's lock fresh would make a dead one look alive.
      const refresh = setInterval(() => {
        const now = new Date();
        try {
          if (readLockText(lockFile) === mine) utimesSync(lockFile, now, now);
        } catch {
          // removed by hand: nothing to keep fresh
        }
      }, LOCK_REFRESH_MS).unref();
      return () => {
        clearInterval(refresh);
        // The lock first: a lock whose beacon is missing is judged by its age, never taken over at once.
        // Only ours, for the same reason: the lock of the process that took ours over stays.
        removeIfStill(lockFile, mine, mine);
        beacon?.close();
      };
    }
    const text = readLockText(lockFile);
    if (text === undefined) continue; // released meanwhile
    const holder = readHolder(text, self);
    const verdict = await holds(holder, lockFile, self);
    if (verdict) {
      const where = !sameKernel(holder, self) ? ' on another machine' : holder.pidNamespace === self.pidNamespace ? '' : ' in another PID namespace (a container)';
      const elsewhere = `${where}${verdict === 'lately' ? ', or was until less than a minute ago' : ''}`;
      throw new DatabaseLockedError(
        `The embedded database is in use by process ${holder.pid}${elsewhere} (lock file ${lockFile}); stop it or set another DATA_DIR`,
      );
    }
    // A lock left by a process that no longer runs (or was taken before by ourselves): taken over, if it
    // is still the one judged. Another process may have taken it over meanwhile, and its lock is judged anew.
    if (removeIfStill(lockFile, text, lockText(self))) await removeDeadBeacon(dirname(lockFile), holder.beacon);
  }
  throw new DatabaseLockedError(`Could not take the lock ${lockFile}`);
}

/**
 * Removes `path` if it still says `text`, and tells whether it did; by one process at a time: the one that
 * makes the mark named for that text, which no two holders share. Checking the lock and then removing it
 * let a taker remove, between the two, the lock another taker had just made (its inode told nothing: ext4
 * gives a removed file's to the next at once), and both opened the database. A mark is held for a moment;
 * one older than a lock's staleness is a taker's that died within it, removed in turn the same way: a mark
 * checked and then removed could be, by then, a live taker's that had replaced it.
 */
function removeIfStill(path: string, text: string, taker: string): boolean {
  const mark = `${path}.${createHash('sha256').update(text).digest('hex').slice(0, 16)}.takeover`;
  // Its own text, as a lock's, tells one mark from another: two takers may name themselves alike (pid 1
  // in two containers, neither with a beacon).
  if (!createWith(mark, `${taker} ${randomBytes(6).toString('hex')}`)) {
    const marked = readLockText(mark);
    // Its age read after its text: a mark made anew since is young, never taken for the one read.
    const markedAt = statSync(mark, { throwIfNoEntry: false })?.mtimeMs;
    if (marked !== undefined && markedAt !== undefined && Date.now() - markedAt > LOCK_STALE_MS) removeIfStill(mark, marked, taker);
    return false;
  }
  try {
    if (readLockText(path) !== text) return false;
    rmSync(path, { force: true });
    return true;
  } finally {
    rmSync(mark, { force: true });
  }
}

/**
 * Removes the beacon a holder gone named, so that every kill does not leave one more behind; only if it is
 * still a socket beside the lock that no process listens on: a lock's text is only a claim, and a live
 * process's socket, or anything else under that name, is not the taker's to remove.
 */
async function removeDeadBeacon(folder: string, name: string | undefined): Promise<void> {
  if (!name || !BEACON_NAME.test(name)) return;
  const path = join(folder, name);
  if (lstatSync(path, { throwIfNoEntry: false })?.isSocket() && (await callBeacon(path)) === false) rmSync(path, { force: true });
}

/**
 * Creates `path` with `text` in it, whole, unless it exists: written under a name of its own and linked
 * into place, so that no reader ever finds it empty or cut short. Where a file system has no hard
 * links, it is created and then written.
 */
function createWith(path: string, text: string): boolean {
  const draft = `${path}.${randomBytes(6).toString('hex')}`;
  writeFileSync(draft, text, { flag: 'wx' });
  try {
    linkSync(draft, path);
    return true;
  } catch (error) {
    const { code } = error as NodeJS.ErrnoException;
    if (code === 'EEXIST') return false;
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw error;
  } finally {
    rmSync(draft, { force: true });
  }
  try {
    writeFileSync(path, text, { flag: 'wx' });
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw error;
  }
}

/**
 * `<pid> <namespace> <JSON: kernel, beacon>`: a reader of before beacons (a server or a backup of an
 * older release) reads the pid and the namespace, and judges as it did.
 */
function lockText(self: Holder): string {
  return `${self.pid} ${self.pidNamespace} ${JSON.stringify({ kernel: self.kernel, beacon: self.beacon })}`;
}

/** A holder that names no kernel (a lock written before kernels were named) is judged as if on ours. */
function sameKernel(holder: Holder, self: Holder): boolean {
  return holder.kernel === undefined || holder.kernel === self.kernel;
}

/** Whether the holder still holds the lock: 'alive' when it was seen to live, 'lately' when its lock is only fresh. */
async function holds(holder: Holder, lockFile: string, self: Holder): Promise<'alive' | 'lately' | false> {
  // The lock may be gone since it was read (released, or taken over): then it holds nothing, and the
  // takeover finds it gone and tries again. One made anew since is fresh: held, and refused.
  const fresh = () => {
    const touchedAt = statSync(lockFile, { throwIfNoEntry: false })?.mtimeMs;
    return touchedAt !== undefined && Date.now() - touchedAt < LOCK_STALE_MS ? 'lately' : false;
  };
  if (!sameKernel(holder, self)) return fresh();
  if (holder.pidNamespace === self.pidNamespace) return isAlive(holder.pid) && holder.pid !== process.pid && 'alive';
  if (holder.beacon && BEACON_NAME.test(holder.beacon)) {
    const answered = await callBeacon(join(dirname(lockFile), holder.beacon));
    if (answered !== undefined) return answered && 'alive';
  }
  return fresh();
}

/**
 * What the lock file says (see `lockText`; before beacons, `<pid> [<namespace>]`). A holder that names
 * no namespace is in ours; one that names details it cannot be read by is on a kernel of its own.
 */
function readHolder(text: string, self: Holder): Holder {
  const [pid, namespace = self.pidNamespace, ...details] = text.trim().split(' ');
  const holder: Holder = { pid: Number(pid), pidNamespace: namespace };
  if (!details.length) return holder;
  const { kernel: holderKernel, beacon } = parseObject(details.join(' '));
  return {
    ...holder,
    kernel: typeof holderKernel === 'string' ? holderKernel : 'unknown',
    beacon: typeof beacon === 'string' ? beacon : undefined,
  };
}

/** A lock file's text (see `lockText`), which no two holders share (a pid, its namespace, a beacon), or a mark's; undefined once it is gone. */
function readLockText(lockFile: string): string | undefined {
  try {
    return readFileSync(lockFile, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

function parseObject(text: string): Record<string, unknown> {
  try {
    const parsed: unknown = JSON.parse(text);
    return typeof parsed === 'object' && parsed !== null ? (parsed as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}

/** A Unix socket beside the lock file, listened on (without holding the process up) until closed; none where one cannot be made. */
async function lightBeacon(folder: string): Promise<Beacon | undefined> {
  const name = `pglite.${randomBytes(6).toString('hex')}.sock`;
  const path = join(folder, name);
  // Longer, Node would make the socket under a name cut short, where no one would look for it.
  if (Buffer.byteLength(path) > SOCKET_PATH_MAX) return undefined;
  const server: Server = createServer((connection) => connection.destroy());
  const listening = await new Promise<boolean>((resolve) => {
    server.once('error', () => resolve(false));
    server.listen(path, () => resolve(true));
  });
  if (!listening) return undefined;
  // A failure to accept a connection (out of file descriptors) is no failure of the server it keeps.
  server.on('error', () => {});
  server.unref();
  return {
    name,
    close: () => {
      server.close();
      rmSync(path, { force: true });
    },
  };
}

/** True when a process listens on the socket, false when the kernel says none does, undefined when it tells nothing. */
function callBeacon(path: string): Promise<boolean | undefined> {
  return new Promise((resolve) => {
    const connection = createConnection(path);
    const settle = (answer: boolean | undefined) => {
      clearTimeout(timer);
      connection.destroy();
      resolve(answer);
    };
    const timer = setTimeout(() => settle(undefined), BEACON_TIMEOUT_MS);
    connection.once('connect', () => settle(true));
    // ENOENT (the socket removed by hand, or the holder releasing) tells nothing: the lock's age decides.
    connection.once('error', (error: NodeJS.ErrnoException) => settle(error.code === 'ECONNREFUSED' ? false : undefined));
  });
}

/**
 * The PID namespace this process's pid is counted in. Each container has its own, where the server is
 * typically pid 1: a process in another one (a backup run in a second container on the same volume)
 * could neither tell whether the holder lives nor tell its pid from its own.
 */
function pidNamespace(): string {
  try {
    return readlinkSync('/proc/self/ns/pid');
  } catch {
    return 'none'; // not Linux: one namespace
  }
}

/** This boot of this machine's kernel (Linux); elsewhere, the machine's name. */
function kernel(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return `host:${hostname()}`;
  }
}

function isAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
  return !hasExited(pid);
}

/**
 * Linux: whether a pid that can still be signalled is a process that has exited and that its parent has
 * not collected yet (a zombie): it holds nothing, the database least of all, and a restart after a kill
 * waited for the parent (a supervisor slow to collect) to start. Its state is the letter after the
 * command's closing parenthesis in /proc/<pid>/stat (a command may hold spaces and parentheses).
 */
function hasExited(pid: number): boolean {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT' && existsSync('/proc/self/stat'); // gone meanwhile; no /proc elsewhere
  }
  const state = stat[stat.lastIndexOf(')') + 2];
  return state === 'Z' || state === 'X';
}
