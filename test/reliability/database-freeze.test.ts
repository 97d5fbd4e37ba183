import { type AddressInfo, connect, createServer, type Socket } from 'node:net';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { buildApp } from '../../src/app.js';
import { type Database, openDatabase } from '../../src/db/database.js';
import { createProject, expectProblem, registerUser, testConfig } from '../support/app.js';
import { FakeUpstream } from '../support/fake-upstream.js';
import { PostgresServer } from '../support/postgres-server.js';

// Runs in both test modes against a PostgreSQL server of its own, reached through a proxy that can freeze.
vi.setConfig({ testTimeout: 120_000, hookTimeout: 120_000 });

/** The bound on an unanswered statement this test gives the service (DATABASE_QUERY_TIMEOUT_MS). */
const QUERY_TIMEOUT_MS = 2_000;

/**
 * A TCP proxy to PostgreSQL that can stop passing anything on, both ways, without closing a connection:
 * what a database whose host froze, or a network that silently drops its packets, looks like to a client.
 * A new connection meanwhile is accepted and then hears nothing. Thawed, everything held goes on.
 */
class FreezingProxy {
  private frozen = false;
  private readonly pairs = new Set<[Socket, Socket]>();

  private constructor(private readonly server: ReturnType<typeof createServer>) {}

  static async start(target: URL): Promise<FreezingProxy> {
    const server = createServer();
    const proxy = new FreezingProxy(server);
    server.on('connection', (client) => {
      const pair: [Socket, Socket] = [client, connect(Number(target.port), target.hostname)];
      proxy.pairs.add(pair);
      for (const socket of pair) {
        socket.on('error', () => {}).on('close', () => {
          proxy.pairs.delete(pair);
          pair.forEach((s) => s.destroy());
        });
      }
      if (!proxy.frozen) pass(pair);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  url(target: URL): string {
    const url = new URL(target);
    url.port = String((this.server.address() as AddressInfo).port);
    return url.toString();
  }

  /** Unpiped and paused: a pipe would resume its source at the next drain. */
  freeze(): void {
    this.frozen = true;
    for (const [client, upstream] of this.pairs) {
      client.unpipe(upstream).pause();
      upstream.unpipe(client).pause();
    }
  }

  thaw(): void {
    this.frozen = false;
    for (const pair of this.pairs) pass(pair);
  }

  close(): void {
    this.server.close();
    for (const pair of this.pairs) pair.forEach((socket) => socket.destroy());
  }
}

function pass([client, upstream]: [Socket, Socket]): void {
  client.pipe(upstream);
  upstream.pipe(client);
}

let postgres: PostgresServer | undefined;
let proxy: FreezingProxy | undefined;
let fake: FakeUpstream | undefined;
let app: FastifyInstance | undefined;
let database: Database | undefined;

beforeAll(async () => {
  postgres = await PostgresServer.start();
  const target = new URL(postgres.url);
  proxy = await FreezingProxy.start(target);
  fake = await FakeUpstream.start();
  const config = testConfig({
    DATABASE_URL: proxy.url(target),
    DATABASE_QUERY_TIMEOUT_MS: String(QUERY_TIMEOUT_MS),
    AI_BASE_URL: fake.url,
    AI_MODEL: 'gpt-4o-mini',
  });
  // Opened here, as buildApp would, to look at its pool.
  database = await openDatabase(config);
  await database.migrate();
  app = await buildApp(config, { database });
});

afterAll(async () => {
  proxy?.thaw();
  await app?.close();
  await database?.close();
  proxy?.close();
  await fake?.close();
  await postgres?.destroy();
});

it('gives up on a statement waiting inside a transaction without handing its transaction to the next request', async () => {
  const user = await registerUser(app!);
  const project = await createProject(app!, user);
  // Another session holds the project's row, as a long transaction would: the delete's transaction
  // waits for it past the bound, its connection holding the transaction open.
  const other = new pg.Client({ connectionString: postgres!.url });
  await other.connect();
  try {
    await other.query('begin');
    await other.query('select 1 from projects where id = $1 for update', [project.id]);
    const started = Date.now();
    const deleted = await app!.inject({ method: 'DELETE', url: `/api/v1/projects/${project.id}`, headers: user.auth });
    expectProblem(deleted, 503, 'SERVICE_UNAVAILABLE');
    // Its rollback, queued behind the unanswered statement, failed at once with the connection closed:
    // it did not wait for a bound of its own.
    expect(Date.now() - started).toBeLessThan(1.75 * QUERY_TIMEOUT_MS);
    await other.query('rollback');

    // Each acknowledged create is committed: none ran inside the delete's transaction on its connection.
    const created = [];
    for (let i = 0; i < 5; i++) created.push((await createProject(app!, user, { name: `after ${i}` })).id);
    const { rows } = await other.query<{ id: string }>('select id from projects where user_id = $1', [user.id]);
    expect(rows.map((row) => row.id).sort()).toEqual([project.id, ...created].sort());
    // And no session is left in a transaction, the given-up one rolled back by the server.
    const open = async () =>
      (await other.query(`select count(*)::int as n from pg_stat_activity where state like 'idle in transaction%' or (state = 'active' and pid <> pg_backend_pid() and backend_type = 'client backend')`)).rows[0].n;
    await expect.poll(open, { timeout: 10_000 }).toBe(0);
  } finally {
    await other.end();
  }
});

it('answers 503 while PostgreSQL hears nothing and says nothing, and serves again once it answers', async () => {
  const user = await registerUser(app!);
  const project = await createProject(app!, user);
  const read = () => app!.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: user.auth });
  expect((await read()).statusCode).toBe(200);

  proxy!.freeze();
  // A transaction whose BEGIN goes unanswered, on a connection the pool had open, gives it back (a
  // request's would meet the freeze at its token's lookup first, unless the freeze came in between).
  await expect(database!.transaction(async () => {})).rejects.toMatchObject({ cause: { message: 'Query read timeout' } });
  // Each is answered, and not after a TCP timeout's quarter of an hour: the statement's bound, or the
  // pool's on a new connection that never gets through its start-up.
  for (let i = 0; i < 3; i++) expectProblem(await read(), 503, 'SERVICE_UNAVAILABLE');
  const chat = await app!.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/chat`, headers: user.auth, payload: { message: 'hello?' } });
  expectProblem(chat, 503, 'SERVICE_UNAVAILABLE');
  expect(fake!.requests).toHaveLength(0); // nothing was sent upstream for a turn that could not be stored
  expect((await app!.inject({ method: 'GET', url: '/health' })).statusCode).toBe(503);

  proxy!.thaw();
  // The connections whose statements were given up on get their answers late, or are replaced: reads
  // succeed again without a restart.
  let answered = 0;
  for (const deadline = Date.now() + 30_000; Date.now() < deadline && answered < 5; ) {
    answered = (await read()).statusCode === 200 ? answered + 1 : 0;
  }
  expect(answered).toBe(5);
  const later = await app!.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/chat`, headers: user.auth, payload: { message: 'back?' } });
  expect(later.statusCode).toBe(200);
  // No connection is left lent out: each given up on was closed and dropped by the pool.
  const pool = database!.poolStats!();
  expect(pool.total - pool.idle).toBe(0);
});
