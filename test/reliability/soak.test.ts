import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { startTestAppWithUpstream, type TestAppWithUpstream } from '../support/app.js';
import { reachableHeapBytes } from '../support/heap.js';
import { MixedTraffic, missingWrites, type Outcome, TrafficClient } from '../support/traffic.js';

/** How long the traffic runs: 60 s in CI; SOAK_SECONDS shortens it for a local run. */
const SOAK_MS = Number(process.env.SOAK_SECONDS ?? 60) * 1000;
/** Heap is measured from here on: caches, compiled code and pools have mostly filled up by then. */
const WARM_UP_MS = SOAK_MS / 3;
/**
 * Heap growth allowed from the end of warm-up to the end, after full collections: 2 KB per request
 * (less than one retained request and reply weigh), but at least 4 MB for what still warms up (compiled
 * code) and the ids this test keeps. Measured over 60 s: 0.1 to 2 MB in all, nearly all of it those.
 */
const GROWTH_PER_REQUEST_KB = 2;
const GROWTH_FLOOR_MB = 4;

vi.setConfig({ testTimeout: SOAK_MS + 120_000 });

let t: TestAppWithUpstream;
let baseUrl: string;

beforeAll(async () => {
  // A small context budget keeps each turn's cost level while the history grows.
  t = await startTestAppWithUpstream({ AI_MODEL: 'gpt-4o-mini', AI_CONTEXT_TOKENS: '2000' });
  t.fake.setDefault({ delayMs: 20 });
  baseUrl = await t.app.listen({ port: 0, host: '127.0.0.1' });
});

afterAll(() => t.close());

it('serves mixed traffic without a 5xx, a growing heap or a leaked database connection', async () => {
  const counts = new Map<string, number>();
  let requests = 0;
  const failures: Outcome[] = [];
  const client = new TrafficClient(baseUrl, (outcome) => {
    counts.set(outcome.op, (counts.get(outcome.op) ?? 0) + 1);
    requests++;
    if (outcome.status < 200 || outcome.status >= 300) failures.push(outcome);
  });
  const traffic = new MixedTraffic(client, { users: 4, pauseMs: 25 });
  const startedAt = performance.now();
  let baselineMb: number;
  let requestsAtBaseline: number;
  try {
    await sleep(WARM_UP_MS);
    baselineMb = heapAfterCollectionMb();
    requestsAtBaseline = requests;
    await sleep(SOAK_MS - WARM_UP_MS);
  } finally {
    await traffic.stop();
  }
  const seconds = (performance.now() - startedAt) / 1000;
  const finalMb = heapAfterCollectionMb();
  const growthLimitMb = Math.max(GROWTH_FLOOR_MB, ((requests - requestsAtBaseline) * GROWTH_PER_REQUEST_KB) / 1024);

  expect(failures, 'requests that did not succeed').toEqual([]);
  expect(requests / seconds, 'requests per second').toBeGreaterThan(5);
  expect(finalMb - baselineMb, `heap growth, MB (from ${baselineMb.toFixed(1)})`).toBeLessThan(growthLimitMb);
  expect(await missingWrites(t.testDb.database.db, client.acknowledged)).toEqual({ users: [], projects: [], prompts: [], messages: [] });
  const connections = await checkConnections();

  process.stdout.write(
    `soak: ${JSON.stringify({
      seconds: Math.round(seconds),
      requests,
      perSecond: Math.round(requests / seconds),
      byOperation: Object.fromEntries(counts),
      heapMb: { afterWarmUp: round(baselineMb), end: round(finalMb), limit: round(growthLimitMb) },
      connections,
      writesVerified: Object.values(client.acknowledged).reduce((sum, ids) => sum + ids.size, 0),
    })}\n`,
  );
});

function heapAfterCollectionMb(): number {
  // The fake upstream, in this process, keeps every request it received: not the server's memory.
  t.fake.requests.length = 0;
  return reachableHeapBytes() / 1024 / 1024;
}

const round = (mb: number) => Math.round(mb * 10) / 10;

/**
 * PostgreSQL: every connection of the test database belongs to the pool and is idle again, none left in
 * a transaction or checked out. Embedded PGlite has no pool and no connections to leak: it must still
 * answer at once.
 */
async function checkConnections(): Promise<Record<string, number> | 'embedded, no pool'> {
  const { database, url } = t.testDb;
  if (!url) {
    await database.ping(2_000);
    return 'embedded, no pool';
  }
  const pool = database.poolStats!();
  expect(pool.waiting).toBe(0);
  expect(pool.idle, 'pool clients still checked out once the traffic stopped').toBe(pool.total);
  const admin = new pg.Client({ connectionString: process.env.TEST_DATABASE_URL });
  await admin.connect();
  try {
    const { rows } = await admin.query<{ state: string | null }>('select state from pg_stat_activity where datname = $1', [
      new URL(url).pathname.slice(1),
    ]);
    expect(rows.length, 'connections to the test database beside the pool').toBe(pool.total);
    expect(rows.filter((row) => row.state !== 'idle'), 'sessions not idle').toEqual([]);
    return { pool: pool.total, sessions: rows.length };
  } finally {
    await admin.end();
  }
}
