import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { buildApp } from '../../src/app.js';
import { type Database, openPostgres } from '../../src/db/database.js';
import { testConfig } from '../support/app.js';
import { FakeUpstream } from '../support/fake-upstream.js';
import { PostgresServer } from '../support/postgres-server.js';
import type { SseEvent } from '../support/sse.js';
import { missingWrites, MixedTraffic, type Outcome, TrafficClient } from '../support/traffic.js';

// Runs in both test modes against a PostgreSQL server of its own, which it stops and starts.
vi.setConfig({ testTimeout: 180_000, hookTimeout: 120_000 });

const POOL_SIZE = 10;
/** The pool gives up connecting after 500 ms: a request that meets the outage is told at once, not left hanging. */
const CONNECT_TIMEOUT_MS = 500;
/** How long such a request may take to answer 503, generous for a loaded machine. */
const OUTAGE_ANSWER_BOUND_MS = 5_000;
/** How long each outage lasts at least, under traffic. */
const OUTAGE_MS = 2_000;
/** Successful requests wanted before the first outage and after each recovery. */
const SUCCESSES_PER_PHASE = 40;

let postgres: PostgresServer | undefined;
let database: Database | undefined;
let app: FastifyInstance | undefined;
let fake: FakeUpstream | undefined;
let baseUrl: string;

beforeAll(async () => {
  postgres = await PostgresServer.start();
  database = openPostgres(postgres.url, { max: POOL_SIZE, connectionTimeoutMs: CONNECT_TIMEOUT_MS });
  await database.migrate();
  fake = await FakeUpstream.start();
  // Answers that take a while, so that turns are in flight when the database goes.
  fake.setDefault({ delayMs: 100, chunkDelayMs: 200 });
  app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini' }), { database });
  baseUrl = await app.listen({ port: 0, host: '127.0.0.1' });
});

afterAll(async () => {
  await app?.close();
  await database?.close();
  await fake?.close();
  await postgres?.destroy();
});

interface Outage {
  mode: 'fast' | 'immediate';
  /** When the server was asked to stop, had stopped, was asked to start again, and /health said ok again. */
  stopping: number;
  down: number;
  restarting: number;
  recovered: number;
}

it('answers 503 while PostgreSQL is down, says so on /health, recovers without a restart and loses no acknowledged write', async () => {
  const outcomes: Outcome[] = [];
  const client = new TrafficClient(baseUrl, (outcome) => outcomes.push(outcome));
  const traffic = new MixedTraffic(client, { users: 6, pauseMs: 25 });
  const outages: Outage[] = [];
  const session = (await client.signUp())!;
  const streamsCaught: Promise<SseEvent[]>[] = [];
  try {
    await successesSince(outcomes, 0);
    // A clean shutdown (every session terminated), then a crash (recovery from the write-ahead log).
    for (const mode of ['fast', 'immediate'] as const) {
      // One stream surely under way when the database goes, and ending before it is back: its answer
      // (an echo, one word per 200 ms) takes about 4 s, and the outage lasts until it has ended.
      let deltas = 0;
      const caught = client.chatStream(session, `${'long '.repeat(20)}question`, (e) => void (e.event === 'delta' && deltas++));
      streamsCaught.push(caught);
      await expect.poll(() => deltas, { timeout: 30_000 }).toBeGreaterThan(0);
      const stopping = performance.now();
      await postgres!.stop(mode);
      const down = performance.now();
      const health = await fetch(`${baseUrl}/health`);
      expect(health.status).toBe(503);
      expect((await health.json()).checks).toEqual({ database: 'down' });
      expect((await fetch(`${baseUrl}/health/live`)).status).toBe(200);
      await Promise.all([sleep(OUTAGE_MS), caught]);

      const restarting = performance.now();
      await postgres!.resume();
      const recovered = await healthyAgain();
      await successesSince(outcomes, recovered);
      outages.push({ mode, stopping, down, restarting, recovered });
    }
  } finally {
    await traffic.stop();
  }

  // A stream that outlived its database ends with an error event naming its stored question.
  for (const events of await Promise.all(streamsCaught)) {
    const userMessageId = (events[0]!.data.userMessage as { id: string }).id;
    expect(events.at(-1)).toMatchObject({ event: 'error', data: { status: 503, code: 'SERVICE_UNAVAILABLE', userMessageId } });
  }

  // Nothing but successes and 503 SERVICE_UNAVAILABLE: no 500, no hanging request, no dropped connection.
  const unexpected = outcomes.filter((o) => !isSuccess(o) && !isUnavailable(o));
  expect(unexpected, 'requests that neither succeeded nor answered 503 SERVICE_UNAVAILABLE').toEqual([]);

  for (const [i, outage] of outages.entries()) {
    const during = outcomes.filter((o) => o.startedAt >= outage.down && o.endedAt <= outage.restarting);
    expect(during.length, `requests during the ${outage.mode} outage`).toBeGreaterThan(10);
    expect(during.filter((o) => !isUnavailable(o)), `${outage.mode} outage: all 503`).toEqual([]);
    const slowest = Math.max(...during.map((o) => o.endedAt - o.startedAt));
    expect(slowest, `slowest 503 during the ${outage.mode} outage, ms`).toBeLessThan(OUTAGE_ANSWER_BOUND_MS);

    // Once /health is ok again, everything works: the pool made new connections by itself.
    const nextStop = outages[i + 1]?.stopping ?? Number.POSITIVE_INFINITY;
    const after = outcomes.filter((o) => o.startedAt >= outage.recovered && o.endedAt <= nextStop);
    expect(after.filter((o) => !isSuccess(o)), `after the ${outage.mode} outage: all 2xx`).toEqual([]);
  }

  // Every acknowledged write is there, read through the same pool that lived through both outages.
  const acknowledged = client.acknowledged;
  for (const ids of Object.values(acknowledged)) expect(ids.size).toBeGreaterThan(0);
  expect(await missingWrites(database!.db, acknowledged)).toEqual({ users: [], projects: [], prompts: [], messages: [] });

  // No client leaked by the failures: none checked out or waited for, and none left in a transaction.
  const pool = database!.poolStats!();
  expect(pool.waiting).toBe(0);
  expect(pool.idle, 'clients still checked out once the traffic stopped').toBe(pool.total);
  expect(pool.total).toBeLessThanOrEqual(POOL_SIZE);
  const admin = new pg.Client({ connectionString: postgres!.url });
  await admin.connect();
  try {
    const sessions = () => admin.query<{ state: string | null }>(
      `select state from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()`,
    );
    expect((await sessions()).rows.filter((row) => row.state !== 'idle')).toEqual([]);
    // Closing the pool ends every connection it made: a client that was never released would stay.
    await app!.close();
    app = undefined;
    await database!.close();
    database = undefined;
    await expect.poll(async () => (await sessions()).rowCount, { timeout: 10_000 }).toBe(0);
  } finally {
    await admin.end();
  }

  const summary = {
    requests: outcomes.length,
    succeeded: outcomes.filter(isSuccess).length,
    unavailable: outcomes.filter(isUnavailable).length,
    outages: outages.map((o) => `${o.mode}: down ${Math.round(o.restarting - o.down)} ms, healthy ${Math.round(o.recovered - o.restarting)} ms after restart`),
    writesVerified: Object.values(acknowledged).reduce((sum, ids) => sum + ids.size, 0),
  };
  process.stdout.write(`database outage: ${JSON.stringify(summary)}\n`);
});

const isSuccess = (o: Outcome) => o.status >= 200 && o.status < 300;
const isUnavailable = (o: Outcome) => o.status === 503 && o.code === 'SERVICE_UNAVAILABLE';

/** Waits for enough successful requests that started at or after `since`. */
async function successesSince(outcomes: Outcome[], since: number): Promise<void> {
  await expect
    .poll(() => outcomes.filter((o) => o.startedAt >= since && isSuccess(o)).length, { timeout: 60_000, interval: 50 })
    .toBeGreaterThanOrEqual(SUCCESSES_PER_PHASE);
}

/** Polls /health until it says ok; returns when it did. */
async function healthyAgain(): Promise<number> {
  await expect.poll(async () => (await fetch(`${baseUrl}/health`)).status, { timeout: 60_000, interval: 50 }).toBe(200);
  return performance.now();
}
