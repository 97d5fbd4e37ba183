import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { openDatabase, pgliteFolder } from '../src/db/database.js';
import { adminQuery } from '../test/support/database.js';
import {
  freePort,
  type NodeProcess,
  type NodeServerOptions,
  spawnNodeServer,
  spawnServer,
  waitUntilServing,
} from '../test/support/server-process.js';
import { HttpClient } from './http-client.js';
import { type CpuMeter, cpuSeconds, ownCpu, postgresBackendsCpu } from './proc.js';
import { type RoundTrip, RoundTripRecorder } from './round-trips.js';
import { type Seed, seed } from './seed.js';
import type { UpstreamBehaviour } from './workload.js';

/**
 * Two cores: the server being measured (ours, a baseline or the gateway, with every thread it starts)
 * has core 0 to itself; this process (load generator and clients) and the fake upstream share core 1.
 * PostgreSQL is the machine's own service, shared with whatever else runs here: it is left to the
 * scheduler on both cores.
 */
const SERVER_CPU = '0';
const HARNESS_CPU = '1';

const LOG_DIR = 'bench/logs';

export interface BenchOptions {
  /** Runs the service with --cpu-prof, its profile written to this folder when it stops. */
  cpuProfileDir?: string;
  /** Samples what the service allocates once it answers (bench/heap-sampler.mjs), written to this folder when it stops. */
  heapProfileDir?: string;
}

export interface RunningServer {
  url: string;
  pid: number;
}

/** A connection to the service that sends the seeded user's token with every request. */
export interface SignedIn {
  client: HttpClient;
  /** The header's value, for load generators that bring their own connections. */
  authorization: string;
}

export interface Bench {
  readonly database: 'postgres' | 'pglite';
  /** How processes were assigned to cores, for the report. */
  readonly pinning: string;
  /** The CPU (taskset's list) of the server being measured; undefined when nothing is pinned. */
  readonly serverCpus: string | undefined;
  readonly seed: Seed;
  /** The service: the instance started last (see `restartService`). */
  readonly service: RunningServer & SignedIn;
  /**
   * Stops the service and starts it again, for a figure that measures the process itself (figure 6's
   * memory): what the figures before it left in its heap is not in its measure. The figures after it
   * meet this instance.
   */
  restartService(): Promise<void>;
  readonly fake: FakeUpstreamControl;
  /** The CPU of the PostgreSQL backends serving the bench database; none on embedded PGlite, which runs inside the service. */
  readonly databaseCpu: Record<string, CpuMeter>;
  /** All the CPU the bench itself uses: this process, every process it started, its database backends. */
  readonly benchCpu: CpuMeter;
  /** The baselines and the peer start on first use. */
  bareHttp(): Promise<RunningServer>;
  bareFastify(): Promise<RunningServer>;
  fastifyPg(): Promise<RunningServer>;
  gateway(): Promise<RunningServer>;
  /**
   * Database round trips of `work` on a second instance of the service, after one unrecorded run of
   * it (connections opened); `prepare` runs before each, unrecorded. Kept for the report under `what`.
   * PostgreSQL only: undefined on the embedded database, which has no wire to listen on.
   */
  countRoundTrips(what: string, work: (probe: SignedIn) => Promise<unknown>, prepare?: (probe: SignedIn) => Promise<unknown>): Promise<number | undefined>;
  /** Round trips recorded by the figures, for the report. */
  readonly roundTrips: { what: string; trips: RoundTrip[] }[];
  /** The pool's projects in turn. */
  nextPoolProject(): string;
  close(): Promise<void>;
}

export class FakeUpstreamControl {
  private readonly control: HttpClient;

  constructor(
    readonly url: string,
    readonly pid: number,
  ) {
    this.control = new HttpClient(url);
  }

  async behave(behaviour: UpstreamBehaviour): Promise<void> {
    await this.control.request('PUT', '/__behaviour', JSON.stringify(behaviour));
  }

  /** The body of the last chat completion request the fake received. */
  async lastChat(): Promise<string> {
    return (await this.control.request('GET', '/__last-chat')).body;
  }

  close(): void {
    this.control.close();
  }
}

export async function startBench(options: BenchOptions): Promise<Bench> {
  const stack = new Stack();
  try {
    return await start(options, stack);
  } catch (error) {
    await stack.unwind();
    throw error;
  }
}

async function start(options: BenchOptions, stack: Stack): Promise<Bench> {
  const started = new Set<number>();
  const startServer = async (name: string, options: NodeServerOptions, readyPath?: string) => {
    const server = spawnNodeServer(options);
    await watch(server, name, readyPath);
    return server;
  };
  /**
   * Stopped at the end, its CPU counted as the bench's own: read from /proc while it runs; once it has
   * exited and been waited for (a service restarted), in this process's own children's time (`ownCpu`).
   */
  const watch = async (server: NodeProcess, name: string, readyPath?: string) => {
    const pid = server.child.pid!;
    started.add(pid);
    void server.exited.then(() => started.delete(pid));
    stack.push(() => stop(server, name));
    await waitUntilServing(server, 60_000, readyPath);
  };

  const pinned = availableParallelism() >= 2 && hasTaskset();
  if (pinned) execFileSync('taskset', ['-a', '-p', '-c', HARNESS_CPU, String(process.pid)], { stdio: 'ignore' });
  const serverCpus = pinned ? SERVER_CPU : undefined;
  const harnessCpus = pinned ? HARNESS_CPU : undefined;
  /** A baseline of figure 1 (`bench/baselines/<name>.ts`), which answers GET /health/live. */
  const startBaseline = async (name: string) => {
    const port = await freePort();
    return running(await startServer(name, { script: `bench/baselines/${name}.ts`, port, env: { PORT: String(port) }, cpus: serverCpus }));
  };

  const dataDir = mkdtempSync(join(tmpdir(), 'chatbot-bench-'));
  stack.push(() => rmSync(dataDir, { recursive: true, force: true }));
  const databaseUrl = process.env.DATABASE_URL ? await createBenchDatabase(process.env.DATABASE_URL, stack) : undefined;

  const database = await openDatabase({ DATABASE_URL: databaseUrl, DATA_DIR: dataDir });
  let seeded: Seed;
  try {
    await database.migrate();
    seeded = await seed(database);
  } finally {
    await database.close();
  }
  // A PGlite folder serves one process: the SQL baseline reads a copy made before the service opens it.
  const baselineCopy = join(dataDir, 'baseline-pglite');
  if (!databaseUrl) cpSync(pgliteFolder(dataDir), baselineCopy, { recursive: true });

  const fakePort = await freePort();
  const fake = await startServer('fake-upstream', { script: 'bench/fake-upstream.ts', port: fakePort, env: { PORT: String(fakePort) }, cpus: harnessCpus });
  const fakeControl = new FakeUpstreamControl(fake.url, fake.child.pid!);
  stack.push(() => fakeControl.close());

  const serviceEnv: Record<string, string> = {
    NODE_ENV: 'production',
    JWT_SECRET: randomBytes(48).toString('base64url'),
    // The default level, at which each request is logged: what a service runs with unless told otherwise.
    LOG_LEVEL: 'info',
    BCRYPT_ROUNDS: '12',
    AI_BASE_URL: `${fake.url}/v1`,
    OPENAI_API_KEY: 'sk-bench',
    // The limits' ceilings: the benchmarks measure the service, not its rate limiter turning them away
    // (figure 6 holds 5,000 streams of one user open, figure 4 200 chats at once).
    RATE_LIMIT_API: '10000000',
    RATE_LIMIT_CHAT: '1000000',
    RATE_LIMIT_LOGIN: '1000000',
    RATE_LIMIT_REGISTER: '1000000',
    CHAT_CONCURRENCY_PER_USER: '1000000',
    ...(databaseUrl ? { DATABASE_URL: databaseUrl } : {}),
  };
  const nodeArgs: string[] = [];
  if (options.cpuProfileDir) {
    mkdirSync(options.cpuProfileDir, { recursive: true });
    nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${options.cpuProfileDir}`);
  }
  if (options.heapProfileDir) {
    mkdirSync(options.heapProfileDir, { recursive: true });
    nodeArgs.push('--import', pathToFileURL(resolve('bench/heap-sampler.mjs')).href);
    serviceEnv.BENCH_HEAP_PROFILE_DIR = resolve(options.heapProfileDir);
  }
  // The build, run as production runs it (`node dist/server.js`), not the sources through tsx as `npm
  // start` does: tsx's compiler names every function it emits (esbuild's keepNames), which costs each
  // closure made per request or stream a property of its own (2 KB of heap a stream; 3% of figure 2's
  // CPU a request).
  execFileSync('npm', ['run', '--silent', 'build'], { stdio: 'inherit' });
  const launch = { script: 'dist/server.js', cpus: serverCpus };
  // Its log to a file, as a service's goes to a file or a collector's pipe: not through the harness. Kept
  // with what it printed to standard error (`stop`).
  mkdirSync(LOG_DIR, { recursive: true });
  const logTo = (name: string) => join(LOG_DIR, `${name}.stdout.log`);
  let instances = 0;
  const startService = async () => {
    const name = ++instances === 1 ? 'service' : `service-${instances}`;
    const server = await spawnServer({ ...serviceEnv, DATA_DIR: dataDir }, { ...launch, nodeArgs, stdoutFile: logTo(name) });
    await watch(server, name);
    const signedIn = await signIn(server.url, seeded, stack);
    // Its start-up left out of what is sampled.
    if (options.heapProfileDir) server.child.kill('SIGUSR2');
    return { url: server.url, pid: server.child.pid!, ...signedIn, stop: () => stop(server, name) };
  };
  let service = await startService();

  const lazily = <T>(startIt: () => Promise<T>) => {
    let started: Promise<T> | undefined;
    return () => (started ??= startIt());
  };
  const roundTrips: Bench['roundTrips'] = [];
  /** A second instance of the service, reaching PostgreSQL through a recorder. */
  const roundTripProbe = lazily(async () => {
    const recorder = await RoundTripRecorder.start(databaseUrl!);
    stack.push(() => recorder.close());
    const probe = await spawnServer({ ...serviceEnv, DATABASE_URL: recorder.url, DATA_DIR: dataDir }, { ...launch, stdoutFile: logTo('round-trip-probe') });
    await watch(probe, 'round-trip-probe');
    return { recorder, ...(await signIn(probe.url, seeded, stack)) };
  });
  // The CPU of the processes started that have not been waited for yet.
  const startedCpu = () =>
    [...started].reduce((sum, pid) => {
      try {
        return sum + cpuSeconds(pid);
      } catch {
        return sum; // gone between the exit and its event
      }
    }, 0);
  let poolCursor = 0;
  const databaseCpu: Record<string, CpuMeter> = databaseUrl ? { database: postgresBackendsCpu(new URL(databaseUrl).pathname.slice(1)) } : {};
  return {
    database: databaseUrl ? 'postgres' : 'pglite',
    pinning: pinned
      ? `taskset: the measured server (the service, a baseline or the gateway) on CPU ${SERVER_CPU}; ` +
        `the harness (load generator, clients) and the fake upstream on CPU ${HARNESS_CPU}` +
        (databaseUrl ? '; PostgreSQL unpinned' : '')
      : 'not pinned (taskset or a second CPU missing)',
    serverCpus,
    seed: seeded,
    get service() {
      return service;
    },
    async restartService() {
      service.client.close();
      // Once it has exited and been waited for, its CPU counts in this process's children's time (see `watch`).
      await service.stop();
      service = await startService();
    },
    fake: fakeControl,
    databaseCpu,
    benchCpu: () => ownCpu() + startedCpu() + (databaseCpu.database?.() ?? 0),
    bareHttp: lazily(() => startBaseline('bare-http')),
    bareFastify: lazily(() => startBaseline('bare-fastify')),
    fastifyPg: lazily(async () => {
      const port = await freePort();
      const env = { PORT: String(port), OWNER_ID: seeded.userId, ...(databaseUrl ? { DATABASE_URL: databaseUrl } : { PGLITE_DIR: baselineCopy }) };
      const server = await startServer('fastify-pg', { script: 'bench/baselines/fastify-pg.ts', port, env, cpus: serverCpus }, `/api/v1/projects/${seeded.readProjectId}`);
      return running(server);
    }),
    gateway: lazily(async () => {
      const port = await freePort();
      const script = 'node_modules/@portkey-ai/gateway/build/start-server.js';
      return running(await startServer('gateway', { script, args: [`--port=${port}`], port, cpus: serverCpus }, '/'));
    }),
    async countRoundTrips(what, work, prepare) {
      if (!databaseUrl) return undefined;
      const { recorder, ...probe } = await roundTripProbe();
      await prepare?.(probe);
      await work(probe);
      await prepare?.(probe);
      const trips = await recorder.during(() => work(probe));
      roundTrips.push({ what, trips });
      return trips.length;
    },
    roundTrips,
    nextPoolProject: () => seeded.poolProjectIds[poolCursor++ % seeded.poolProjectIds.length]!,
    close: () => stack.unwind(),
  };
}

function running(server: NodeProcess): RunningServer {
  return { url: server.url, pid: server.child.pid! };
}

async function signIn(url: string, seeded: Seed, stack: Stack): Promise<SignedIn> {
  const anonymous = new HttpClient(url);
  const login = await anonymous.request('POST', '/api/v1/auth/login', JSON.stringify({ email: seeded.email, password: seeded.password }));
  anonymous.close();
  if (login.status !== 200) throw new Error(`login failed: ${login.status} ${login.body}`);
  const authorization = `Bearer ${(JSON.parse(login.body) as { token: string }).token}`;
  const client = new HttpClient(url, { authorization });
  stack.push(() => client.close());
  return { client, authorization };
}

/** A throwaway database on the server of `adminUrl`, dropped when the bench ends. */
async function createBenchDatabase(adminUrl: string, stack: Stack): Promise<string> {
  const name = `chatbot_bench_${randomBytes(6).toString('hex')}`;
  await adminQuery(adminUrl, `create database ${name}`);
  stack.push(() => adminQuery(adminUrl, `drop database if exists ${name} with (force)`));
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

/**
 * SIGTERM (graceful: a profiled service writes its profile), SIGKILL if it takes too long. What the
 * process printed is kept in bench/logs/<name>.log (the service's log, its standard output, is in
 * bench/logs/<name>.stdout.log already).
 */
async function stop(server: NodeProcess, name: string): Promise<void> {
  if (server.child.exitCode === null) {
    server.child.kill('SIGTERM');
    const killer = setTimeout(() => server.child.kill('SIGKILL'), 20_000);
    await server.exited;
    clearTimeout(killer);
  }
  mkdirSync(LOG_DIR, { recursive: true });
  writeFileSync(join(LOG_DIR, `${name}.log`), server.output());
}

function hasTaskset(): boolean {
  try {
    execFileSync('taskset', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Clean-ups, run last first. */
class Stack {
  private readonly steps: (() => unknown)[] = [];

  push(step: () => unknown): void {
    this.steps.push(step);
  }

  async unwind(): Promise<void> {
    while (this.steps.length) {
      try {
        await this.steps.pop()!();
      } catch (error) {
        process.stderr.write(`bench clean-up: ${(error as Error).message}\n`);
      }
    }
  }
}
