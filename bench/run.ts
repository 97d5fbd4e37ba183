import { readdirSync, statSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { type Bench, startBench } from './environment.js';
import { failedRow, type Figure, type Row } from './figure.js';
import { authenticatedRead } from './figures/authenticated-read.js';
import { chatLatency } from './figures/chat-latency.js';
import { chatThroughput } from './figures/chat-throughput.js';
import { frameworkFloor } from './figures/framework-floor.js';
import { historyScaling } from './figures/history-scaling.js';
import { loginIsolation } from './figures/login-isolation.js';
import { openStreams } from './figures/open-streams.js';
import { peer } from './figures/peer.js';
import { streaming } from './figures/streaming.js';
import { type ColdCalls, measureColdCalls } from './cold-probe.js';
import { summarizeFile } from './profile-summary.js';
import { cpuShares, machineCpu } from './proc.js';
import { type Background, currentRevision, describeMachine, writeReport } from './report.js';

/**
 * `npm run bench`: every figure of the performance issue against its baseline, in one run.
 *   npm run bench -- --only=1,3        some figures
 *   npm run bench -- --cpu-prof        the service profiled (bench/profiles/*.cpuprofile)
 *   npm run bench -- --heap-prof       what the service allocates, sampled (bench/profiles/*.heapprofile)
 * DATABASE_URL names a PostgreSQL server where a throwaway database is made; without it, embedded PGlite.
 */
const FIGURES: Figure[] = [
  frameworkFloor,
  authenticatedRead,
  chatLatency,
  chatThroughput,
  streaming,
  openStreams,
  loginIsolation,
  historyScaling,
  peer,
];

const args = process.argv.slice(2);
const only = args.find((arg) => arg.startsWith('--only='))?.slice('--only='.length).split(',').map(Number);
const unknown = only?.filter((number) => !FIGURES.some((figure) => figure.number === number));
if (unknown?.length) throw new Error(`--only: no figure ${unknown.join(', ')}; there are ${FIGURES.map((figure) => figure.number).join(', ')}`);
const selected = FIGURES.filter((figure) => !only || only.includes(figure.number));
const PROFILE_DIR = 'bench/profiles';
const cpuProfileDir = args.includes('--cpu-prof') ? PROFILE_DIR : undefined;
const heapProfileDir = args.includes('--heap-prof') ? PROFILE_DIR : undefined;

const startedAt = new Date().toISOString();
const bench = await startBench({ cpuProfileDir, heapProfileDir });
// Interrupted: still stop every process started and drop the bench database.
process.once('SIGINT', () => void bench.close().finally(() => process.exit(130)));
const rows: Row[] = [];
const background: Background[] = [];
// The machine's speed drifts: how cold code runs is measured before the figures and after them.
const coldCalls: ColdCalls[] = [];
const probeColdCalls = () => {
  try {
    coldCalls.push(measureColdCalls(bench.serverCpus));
  } catch (error) {
    log(`cold-code probe failed: ${(error as Error).message}`);
  }
};
try {
  probeColdCalls();
  for (const figure of selected) {
    log(`figure ${figure.number}: ${figure.title}`);
    // What the rest of the machine did meanwhile tells how far the figure can be trusted.
    const checkpointsBefore = await checkpointBuffers();
    const { result: figureRows, shares } = await cpuShares({ machine: machineCpu, bench: bench.benchCpu }, () => runFigure(figure, bench));
    const checkpointsAfter = await checkpointBuffers();
    background.push({
      figure: figure.number,
      othersCpu: shares.machine! - shares.bench!,
      loadAverage: loadavg()[0]!,
      ...(checkpointsBefore !== undefined && checkpointsAfter !== undefined ? { checkpointBuffers: checkpointsAfter - checkpointsBefore } : {}),
    });
    rows.push(...figureRows);
    for (const row of figureRows) log(`  ${row.measure}: ${row.ours} ${row.unit}${row.baseline ? ` (baseline ${row.baseline.value})` : ''}`);
  }
  probeColdCalls();
} finally {
  await bench.close();
}
writeReport(
  {
    startedAt,
    finishedAt: new Date().toISOString(),
    revision: currentRevision(),
    machine: describeMachine(await postgresVersion()),
    database: bench.database,
    pinning: bench.pinning,
    coldCalls,
    rows,
    background,
    roundTrips: bench.roundTrips,
  },
  'bench/results.json',
  'bench/results.md',
);
log('wrote bench/results.json and bench/results.md');
if (cpuProfileDir || heapProfileDir) summarizeProfiles(PROFILE_DIR, Date.parse(startedAt));

async function runFigure(figure: Figure, bench: Bench): Promise<Row[]> {
  try {
    return await figure.run(bench);
  } catch (error) {
    log(`  figure ${figure.number} failed: ${(error as Error).stack ?? String(error)}`);
    return [failedRow(figure, error)];
  }
}

/** What `ask` makes of a connection to the bench's PostgreSQL server; undefined on the embedded database. */
async function askPostgres<T>(ask: (client: pg.Client) => Promise<T>): Promise<T | undefined> {
  if (!process.env.DATABASE_URL) return undefined;
  const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  try {
    return await ask(client);
  } finally {
    await client.end();
  }
}

/**
 * The buffers the server's checkpoints have written since its statistics were reset (the checkpointer
 * reports them as it goes, a spread checkpoint's too); undefined on the embedded database, or when they
 * cannot be read: the figures go on without them.
 */
async function checkpointBuffers(): Promise<number | undefined> {
  try {
    return await askPostgres(async (client) => {
      // PostgreSQL 17 moved them to pg_stat_checkpointer.
      const { moved } = (await client.query<{ moved: boolean }>(`select current_setting('server_version_num')::int >= 170000 as moved`)).rows[0]!;
      const statement = moved ? 'select buffers_written as written from pg_stat_checkpointer' : 'select buffers_checkpoint as written from pg_stat_bgwriter';
      return Number((await client.query<{ written: string }>(statement)).rows[0]!.written);
    });
  } catch (error) {
    log(`checkpoint statistics not read: ${(error as Error).message}`);
    return undefined;
  }
}

function postgresVersion(): Promise<string | undefined> {
  return askPostgres(async (client) => {
    const setting = async (name: string) => (await client.query<Record<string, string>>(`show ${name}`)).rows[0]![name]!;
    // What makes a commit durable, as the service's connections find it: said, not assumed.
    const [version, fsync, synchronousCommit] = [await setting('server_version'), await setting('fsync'), await setting('synchronous_commit')];
    const durable = fsync === 'on' && synchronousCommit !== 'off' && synchronousCommit !== 'local';
    return `PostgreSQL ${version}, fsync ${fsync}, synchronous_commit ${synchronousCommit}: ${durable ? 'durable commits' : 'commits NOT durable'}`;
  });
}

/** Each profile the service wrote in this run, summarized beside it (<file>.txt). */
function summarizeProfiles(dir: string, since: number): void {
  for (const file of readdirSync(dir).filter((name) => name.endsWith('.cpuprofile') || name.endsWith('.heapprofile'))) {
    const path = join(dir, file);
    if (statSync(path).mtimeMs < since) continue;
    const summary = summarizeFile(path);
    writeFileSync(`${path}.txt`, `${summary}\n`);
    log(`service profile: ${path} (summary: ${path}.txt)\n${summary.split('\n').slice(0, 20).join('\n')}`);
  }
}

function log(line: string): void {
  process.stdout.write(`${line}\n`);
}
