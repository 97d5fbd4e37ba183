import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Where ports for servers to listen on are looked for: above the well-known services'. */
const LOWEST_PORT = 10_000;
/** How many ports, taken at random, are tried before giving up. */
const PORT_TRIES = 100;

/**
 * A port on 127.0.0.1 that nothing listens on, for a server about to be started there. Taken outside the
 * range the system hands out to outgoing connections: a port from that range (what listening on port 0
 * gives) can be taken by any client's connection, to PostgreSQL, to a fake, in the moment before the
 * server binds it, which failed a test's PostgreSQL start once. At random, so that tests started at
 * the same time look in different places.
 */
export async function freePort(): Promise<number> {
  const [first, last] = ephemeralPorts();
  // Below the range, or above it where a system's range leaves little room below (`1024 65535` leaves none).
  const [from, to] = first - LOWEST_PORT >= 65_536 - last ? [LOWEST_PORT, first] : [last + 1, 65_536];
  for (let tried = 0; tried < PORT_TRIES && to > from; tried++) {
    const port = from + Math.floor(Math.random() * (to - from));
    if (await listenable(port)) return port;
  }
  throw new Error(`no port found free to listen on outside the ephemeral range (${first}–${last}) in ${PORT_TRIES} tries`);
}

/** Linux's ephemeral range; elsewhere, Linux's default, which lies below the others' (49152–65535). */
function ephemeralPorts(): [first: number, last: number] {
  try {
    const [first, last] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (first! > 0 && last! >= first!) return [first!, last!];
  } catch {
    // not Linux
  }
  return [32_768, 60_999];
}

function listenable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

export interface NodeProcess {
  child: ChildProcess;
  url: string;
  output(): string;
  /** Resolves with the exit code once the process has ended. */
  exited: Promise<number | null>;
}

export interface ServerProcess extends NodeProcess {
  dataDir: string;
}

export interface NodeServerOptions {
  /** The entry script, relative to the working directory; a `.ts` one runs through tsx. */
  script: string;
  args?: string[];
  /** Where it listens on 127.0.0.1; the caller passes it on through `env` or `args`. */
  port: number;
  /** The whole environment besides PATH and HOME: nothing else is inherited. */
  env?: Record<string, string>;
  /** Node's own flags, such as `--cpu-prof`. */
  nodeArgs?: string[];
  /** Pins the process and every thread it starts to these CPUs (`taskset -c`), e.g. `0`. */
  cpus?: string;
  /**
   * Runs it as pid 1 of a PID namespace of its own, as a container runs it (`unshare`, root only). Stop it
   * with SIGKILL: unshare ignores SIGTERM, and kills the server when it dies.
   */
  ownPidNamespace?: boolean;
  /**
   * Mounts a memory file system of `bytes` on `path` (an existing folder) that only the server sees: a
   * disk that fills up (`unshare --mount`, root only; see `canMountTmpfs`). The process keeps its pid;
   * the mount is seen from outside under `/proc/<pid>/root`.
   */
  tmpfs?: { path: string; bytes: number };
  /**
   * A file its standard output is written to (made afresh), rather than kept for `output()`: a service
   * logging each request writes more than a harness should hold, or spend its own CPU reading. Standard
   * error is kept.
   */
  stdoutFile?: string;
}

/** Starts a Node.js HTTP server as its own process. */
export function spawnNodeServer(options: NodeServerOptions): NodeProcess {
  const nodeArgs = [...(options.script.endsWith('.ts') ? ['--import', 'tsx'] : []), ...(options.nodeArgs ?? [])];
  const command = [process.execPath, ...nodeArgs, options.script, ...(options.args ?? [])];
  // taskset execs node in its own place: the child's pid stays node's, so signals reach the server.
  const pinned = options.cpus ? ['taskset', '-c', options.cpus, ...command] : command;
  const mounted = options.tmpfs ? [...mountingTmpfs(options.tmpfs), ...pinned] : pinned;
  // --kill-child: the namespace, and the server with it, ends with unshare when the test kills it.
  const [file, ...args] = options.ownPidNamespace ? ['unshare', '--pid', '--kill-child', ...mounted] : mounted;
  const stdout = options.stdoutFile ? openSync(options.stdoutFile, 'w') : 'pipe';
  const child = spawn(file!, args, {
    env: { PATH: process.env.PATH, HOME: process.env.HOME, ...options.env },
    stdio: ['ignore', stdout, 'pipe'],
  });
  if (typeof stdout === 'number') closeSync(stdout); // the child holds its own
  let output = '';
  child.stdout?.on('data', (chunk) => (output += chunk));
  child.stderr!.on('data', (chunk) => (output += chunk));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, url: `http://127.0.0.1:${options.port}`, output: () => output, exited };
}

/**
 * Starts the server as its own process, with a clean environment plus `env`: `src/server.ts` as `npm start`
 * does, or the build's `dist/server.js` as production does (`script`).
 */
export async function spawnServer(
  env: Record<string, string>,
  launch: Partial<Pick<NodeServerOptions, 'script' | 'nodeArgs' | 'cpus' | 'ownPidNamespace' | 'tmpfs' | 'stdoutFile'>> = {},
): Promise<ServerProcess> {
  const port = env.PORT ?? String(await freePort());
  const dataDir = env.DATA_DIR ?? mkdtempSync(join(tmpdir(), 'chatbot-server-'));
  const server = spawnNodeServer({
    script: 'src/server.ts',
    ...launch,
    port: Number(port),
    env: { LOG_LEVEL: 'warn', HOST: '127.0.0.1', ...env, PORT: port, DATA_DIR: dataDir },
  });
  return { ...server, dataDir };
}

/** Polls `path` until the server answers it with a 2xx, or fails with what the process printed. */
export async function waitUntilServing(server: NodeProcess, timeoutMs = 90_000, path = '/health/live'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (server.child.exitCode !== null) throw new Error(`server exited early:\n${server.output()}`);
    try {
      const response = await fetch(`${server.url}${path}`);
      if (response.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`server did not start within ${timeoutMs} ms:\n${server.output()}`);
}

/** A command prefix that runs the rest in a mount namespace of its own with the tmpfs mounted: sh execs it, keeping the pid. */
export function mountingTmpfs({ path, bytes }: { path: string; bytes: number }): string[] {
  return ['unshare', '--mount', 'sh', '-c', 'mount -t tmpfs -o "size=$0" tmpfs "$1" && shift && exec "$@"', String(bytes), path];
}

/** Whether this machine lets us mount a file system in a mount namespace of our own (root on Linux). */
export const canMountTmpfs = ((): boolean => {
  const [unshare, ...args] = mountingTmpfs({ path: tmpdir(), bytes: 1024 * 1024 });
  return spawnSync(unshare!, [...args, 'true']).status === 0;
})();

/** Whether this machine lets us start a process in a PID namespace of its own (root on Linux). */
export const canUsePidNamespaces = spawnSync('unshare', ['--pid', '--fork', 'true']).status === 0;
