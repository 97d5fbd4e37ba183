import { chmodSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { PGlite } from '@electric-sql/pglite';
import { sql } from 'drizzle-orm';
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { migrate as migratePg } from 'drizzle-orm/node-postgres/migrator';
import type { PgDatabase, PgQueryResultHKT } from 'drizzle-orm/pg-core';
import { drizzle as drizzlePglite } from 'drizzle-orm/pglite';
import { migrate as migratePglite } from 'drizzle-orm/pglite/migrator';
import pg from 'pg';
import { settleCutSwap } from './backup-store.js';
import { hasCode } from './error-code.js';
import { Execution } from './named-statement.js';
import { lockPglite } from './pglite-lock.js';
import { schema } from './schema.js';
import { StartupError } from '../startup-error.js';

/**
 * The database as queries see it. Without drizzle's `transaction`, whose BEGIN is outside its own error
 * handling (a BEGIN that failed leaked the pool's connection for good): `Database.transaction` is the one.
 */
export type Db = Omit<PgDatabase<PgQueryResultHKT, typeof schema>, 'transaction'>;

/** One interface over a PostgreSQL pool and embedded PGlite, so nothing above this file can tell them apart. */
export interface Database {
  readonly kind: 'postgres' | 'pglite';
  readonly db: Db;
  /** Resolves when the database answers a trivial query within `timeoutMs`; rejects otherwise. */
  ping(timeoutMs?: number): Promise<void>;
  /**
   * Applies the migrations not yet applied. On PostgreSQL, waiting for another session is done a second
   * at a time, each wait told to `onWait` (`MIGRATIONS_WAIT`, `MIGRATIONS_WAIT_FOR_ANOTHER`), for up to
   * 10 minutes: for another instance applying them (their advisory lock), and for a table another session
   * holds (a backup's pg_dump). A wait ends when `stopping` aborts, with its reason: nothing is applied
   * meanwhile, and a process asked to stop need not wait the minutes out.
   */
  migrate(onWait?: (message: string) => void, stopping?: AbortSignal): Promise<void>;
  close(): Promise<void>;
  /** Connections of the PostgreSQL pool, for metrics; embedded PGlite has no pool. */
  readonly poolStats?: () => PoolStats;
  /**
   * One connection, held until released: what is sent on its `db` runs in the order sent, each
   * statement leaving the moment the one before is answered, with no round trip through the caller in
   * between. Embedded PGlite has one connection, and lends it as it is.
   */
  hold(): Promise<HeldConnection>;
  /**
   * Runs `work` in a transaction on one connection: committed when it resolves, rolled back when it
   * throws. A connection that fails to roll back (lost, or given up on: `BoundedClient`) is closed, so
   * that nothing of the transaction goes back to the pool.
   */
  transaction<T>(work: (tx: Db) => Promise<T>): Promise<T>;
}

export interface HeldConnection {
  readonly db: Db;
  /** Hands the connection back; with an error (it may be broken), it is closed instead. */
  release(error?: Error): void;
}

export interface PoolStats {
  total: number;
  idle: number;
  /** Queries waiting for a connection. */
  waiting: number;
}

export const migrationsFolder = join(import.meta.dirname, 'migrations');

/** What the start and `npm run db:migrate` say each time the migrations wait for a table's lock. */
export const MIGRATIONS_WAIT = 'Migrations wait for a table that another session holds (a backup running, or the requests of instances still serving); trying again in a second';
/** And each time they wait for another session applying them (another instance starting, `db:migrate`). */
export const MIGRATIONS_WAIT_FOR_ANOTHER = 'Migrations wait for another instance (or db:migrate) that is applying them; trying again in a second';

/** How long a migration's statement waits for a table's lock per try, and after how long it gives up. */
const MIGRATION_LOCK_WAIT_MS = 1_000;
const MIGRATION_LOCK_GIVE_UP_MS = 10 * 60_000;
const LOCK_NOT_AVAILABLE = '55P03';
const DEADLOCK_DETECTED = '40P01';

/** Chosen at random once; every instance migrating the same database takes this advisory lock first. */
export const MIGRATION_LOCK_ID = 7_202_611_240;

export interface PostgresOptions {
  /** Pool size; PostgreSQL's default of 100 connections is shared by every instance. */
  max?: number;
  connectionTimeoutMs?: number;
  /**
   * How long a statement may run, waits for locks included: PostgreSQL cancels it then (`statement_timeout`),
   * and a connection that has not answered a moment later is closed (see `BoundedClient`). Migrations are
   * not bound by it.
   */
  queryTimeoutMs?: number;
}

/**
 * A connection that is closed when a statement on it goes unanswered for `unansweredMs`. A database
 * that stops answering without closing its connections (its host frozen, packets dropped) would
 * otherwise hold a request, and its connection, for as long as TCP takes to give up: a quarter of an
 * hour. The statement fails at the bound (QUERY_TIMEOUT_MESSAGE) and its connection is closed: it still
 * owes the statement's answer and may hold its transaction open, so handed back to the pool, the next
 * request's statements would wait behind it, or run inside that transaction and never commit. Closed, it
 * fails at once whatever is queued on it, the pool drops it, and the server rolls back what it left open.
 *
 * Every statement goes to pg with a callback made by `bounded` (a NamedStatement's execution too: pg
 * sets it there), and the bound is this class's, not pg's `query_timeout`. pg's bound, and pg's promise
 * when no callback is given, set a statement's callback to a closure whose scope holds the statement
 * itself, and each such statement then outlived the young generation's collections: with `pg` alone,
 * 4,000 statements one after another, 0.4–6.5 MB went to the old generation at each scavenge, which
 * paused 6–20 ms, against nothing and 0.3 ms with callbacks made apart from the statement
 * (`--trace-gc-nvp`; docs/benchmarks.md, figure 8's tail).
 */
class BoundedClient extends pg.Client {
  private readonly unansweredMs: number;

  constructor(config: pg.ClientConfig & { unansweredMs?: number } = {}) {
    super(config);
    this.unansweredMs = config.unansweredMs ?? Infinity;
  }

  // pg's overloads: text or a config, then values, then a callback (or the config's), or none and a
  // promise of the result.
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  override query(config: any, values?: any, callback?: any): any {
    if (typeof values === 'function') return this.query(config, undefined, values);
    // Any other query object (a cursor's) answers as it was made to, unbounded: none here is.
    if (typeof config?.submit === 'function' && !(config instanceof Execution)) return super.query(config, values, callback);
    if (callback === undefined && typeof config?.callback === 'function') callback = config.callback;
    if (typeof callback === 'function') return this.send(config, values, callback);
    // As pg's own promise: a failure's stack leads back to the caller, not to the socket's read.
    return new Promise((resolve, reject) => this.send(config, values, settle(resolve, reject))).catch(restack);
  }

  /** Sends the statement with its callback made apart from it, and bounds the wait for its answer once sent. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private send(config: any, values: any, callback: QueryCallback): undefined {
    const statement = bounded(this, callback);
    // A statement pg refuses at once throws here, its timer never set.
    super.query(config, values, statement.answer);
    statement.bound(this.unansweredMs);
    return undefined;
  }
}

type QueryCallback = (error: Error | undefined, result?: unknown) => void;

/**
 * A statement's callback (`answer`): `callback` once, with the statement's answer, or with
 * QUERY_TIMEOUT_MESSAGE once `bound`'s `ms` pass without one, `client` then closed (which fails what is
 * queued on it). Made here, apart from the statement: see `BoundedClient`.
 */
function bounded(client: pg.Client, callback: QueryCallback): { answer: QueryCallback; bound(ms: number): void } {
  let answered = false;
  let timer: NodeJS.Timeout | undefined;
  return {
    answer(error, result) {
      clearTimeout(timer);
      if (answered) return;
      answered = true;
      callback(error, result);
    },
    bound(ms) {
      if (answered || ms === Infinity) return;
      timer = setTimeout(() => {
        answered = true;
        callback(new Error(QUERY_TIMEOUT_MESSAGE));
        // end() destroys the socket of a connection whose statement is still unanswered.
        client.end().catch(() => {});
      }, ms);
    },
  };
}

const settle =
  (resolve: (result: unknown) => void, reject: (error: Error) => void): QueryCallback =>
  (error, result) =>
    error ? reject(error) : resolve(result);

function restack(error: Error): never {
  Error.captureStackTrace(error);
  throw error;
}

/**
 * The start's first connection to PostgreSQL failed (refused, unanswered, an unknown database or user, a
 * wrong password): the environment is wrong, which the server says in one line, as a bad variable. pg's
 * messages name the host, database and user, never the password.
 */
export class DatabaseUnreachableError extends StartupError {
  override name = 'DatabaseUnreachableError';
  constructor(cause: unknown) {
    super(`Cannot connect to the database of DATABASE_URL: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
}

/**
 * The embedded database's folder could not be opened (damaged, of another PGlite version, owned by
 * another user, a file where the folder should be): said in one line, as a bad variable is.
 */
export class EmbeddedDatabaseError extends StartupError {
  override name = 'EmbeddedDatabaseError';
  constructor(dataDir: string, cause: unknown) {
    const said = cause instanceof Error ? cause.message : String(cause);
    super(`Cannot open the embedded database in ${dataDir}: ${said.replace(/\s+/g, ' ').trim()}`, { cause });
  }
}

/**
 * Migrations the database refused (a user that may not create in it, a lock that timed out), named by
 * what the database said: drizzle's own message is the failed statement, and the reason is its cause's.
 */
export class MigrationError extends StartupError {
  override name = 'MigrationError';
  constructor(cause: unknown) {
    let reason = cause;
    while (reason instanceof Error && reason.cause !== undefined) reason = reason.cause;
    const said = reason instanceof Error ? reason.message : String(reason);
    super(`Migrations could not be applied: ${said.replace(/\s+/g, ' ').trim()}`, { cause });
  }
}

/**
 * A PostgreSQL database whose encoding cannot hold most languages' text (LATIN1, WIN1252…): every name,
 * prompt or message in Japanese, Arabic or emoji would be refused, with no fault of the client's.
 */
export class DatabaseEncodingError extends StartupError {
  override name = 'DatabaseEncodingError';
  constructor(encoding: string) {
    super(`The database of DATABASE_URL is encoded in ${encoding}, which cannot hold most languages' text: use one created with UTF8 (createdb --encoding=UTF8 --template=template0 <name>)`);
  }
}

/** The encodings that store any text the service is sent: UTF8, and SQL_ASCII, which stores bytes as they come. */
const ENCODINGS_FOR_ANY_TEXT = new Set(['UTF8', 'SQL_ASCII']);

/** Runs migrations; what fails them is a MigrationError. */
async function migrating<T>(run: Promise<T>): Promise<T> {
  return run.catch((error: unknown) => {
    throw error instanceof MigrationError ? error : new MigrationError(error);
  });
}

/** The error of a statement unanswered for its bound (`BoundedClient`), as pg's own `query_timeout` words it. */
const QUERY_TIMEOUT_MESSAGE = 'Query read timeout';

/**
 * How much longer than the database's own bound on a statement the driver waits for its answer: the
 * database gives up first (and rolls the statement back), the driver only when the database itself
 * no longer answers.
 */
const UNANSWERED_AFTER_BOUND_MS = 1_000;

export function openPostgres(url: string, options: PostgresOptions = {}): Database {
  const queryTimeoutMs = options.queryTimeoutMs ?? 60_000;
  const poolConfig: pg.PoolConfig & { unansweredMs: number } = {
    connectionString: url,
    max: options.max ?? 20,
    // A request waiting on a dead database fails fast with 503 instead of hanging.
    connectionTimeoutMillis: options.connectionTimeoutMs ?? 5_000,
    Client: BoundedClient,
    // The database's bound, set before a new connection is lent: a statement the driver stopped waiting
    // for would otherwise still run there once what held it let go (an upload's insert behind a backup's
    // lock), and commit what its request was told (503) was not stored. Not pg's `statement_timeout`
    // option: that is a startup parameter, which PgBouncer refuses by default.
    onConnect: (client) => client.query(`set statement_timeout = ${queryTimeoutMs}`),
    // Given to each connection (BoundedClient), as pg gives it the pool's options.
    unansweredMs: queryTimeoutMs + UNANSWERED_AFTER_BOUND_MS,
    idleTimeoutMillis: 30_000,
  };
  const pool = new pg.Pool(poolConfig);
  // An idle client losing its connection (database restarted) must not crash the process;
  // the pool drops it and the next query opens a new one.
  pool.on('error', () => {});
  const db = drizzlePg(pool, { schema }) as unknown as Db;
  // The pool keeps its connections: each gets its drizzle instance once.
  const onConnection = new WeakMap<pg.PoolClient, Db>();
  async function hold(): Promise<HeldConnection> {
    const { client, release } = await checkOut(pool);
    let held = onConnection.get(client);
    if (!held) onConnection.set(client, (held = drizzlePg(client, { schema }) as unknown as Db));
    return { db: held, release };
  }
  return {
    kind: 'postgres',
    db,
    hold,
    // Not drizzle's: its BEGIN runs before its try, and a BEGIN that fails never gives the connection back.
    async transaction(work) {
      const { db: tx, release } = await hold();
      try {
        await tx.execute(sql`begin`);
        const result = await work(tx);
        // PostgreSQL answers the COMMIT of a transaction a statement failed in (its error caught by
        // `work`) with ROLLBACK, and no error: committed when it resolves, as PGlite's says too.
        const { command } = (await tx.execute(sql`commit`)) as unknown as pg.QueryResult;
        if (command === 'ROLLBACK') throw new Error('Transaction was rolled back instead of committed');
        release();
        return result;
      } catch (error) {
        await tx.execute(sql`rollback`).then(
          () => release(),
          (lost: Error) => release(lost),
        );
        throw error;
      }
    },
    ping: (timeoutMs = 2_000) => withTimeout(pool.query('select 1').then(() => undefined), timeoutMs),
    async migrate(onWait, stopping) {
      // A connection of its own, outside the pool's bound on statements: a migration may wait for as
      // long as another instance's takes (the advisory lock), or for the tables it alters.
      const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: pool.options.connectionTimeoutMillis });
      client.on('error', () => {}); // a lost connection fails what is sent on it
      await client.connect().catch((error: unknown) => {
        throw new DatabaseUnreachableError(error);
      });
      const giveUpAt = Date.now() + MIGRATION_LOCK_GIVE_UP_MS;
      const minutes = `${MIGRATION_LOCK_GIVE_UP_MS / 60_000} minutes`;
      /** Runs `attempt` until it is done, again a second after each time it met another session's lock. */
      const waitingForOthers = async (attempt: () => Promise<boolean>, message: string, givenUp: string) => {
        while (!(await migrating(attempt()))) {
          if (Date.now() + MIGRATION_LOCK_WAIT_MS >= giveUpAt) throw new MigrationError(givenUp);
          onWait?.(message);
          await sleep(MIGRATION_LOCK_WAIT_MS, undefined, { signal: stopping }).catch(() => {
            throw stopping!.reason;
          });
        }
      };
      try {
        const { rows } = await migrating(client.query<{ server_encoding: string }>('show server_encoding'));
        const encoding = rows[0]!.server_encoding;
        if (!ENCODINGS_FOR_ANY_TEXT.has(encoding)) throw new DatabaseEncodingError(encoding);
        // Tried rather than waited for: a wait in pg_advisory_lock has no bound and says nothing, and a
        // holder that never ends (a suspended db:migrate) held every start with it.
        await waitingForOthers(async () => {
          const { rows } = await client.query<{ locked: boolean }>('select pg_try_advisory_lock($1) as locked', [MIGRATION_LOCK_ID]);
          return rows[0]!.locked;
        }, MIGRATIONS_WAIT_FOR_ANOTHER, `another session (an instance starting, db:migrate) has been applying them for ${minutes}`);
        try {
          // A statement that waits for a table's lock queues every later statement on that table behind
          // it: an ALTER TABLE waiting out a backup (pg_dump holds each table it reads until it ends)
          // stalled the instances still serving. Each try waits a second at most, all of it rolled back.
          await migrating(client.query(`set lock_timeout = ${MIGRATION_LOCK_WAIT_MS}`));
          await waitingForOthers(
            () =>
              migratePg(drizzlePg(client), { migrationsFolder }).then(
                () => true,
                (error: unknown) => {
                  // Or a deadlock with the statements of instances still serving, which PostgreSQL may
                  // end on either side: the whole attempt is rolled back, and tried again as a wait is.
                  if (hasCode(error, LOCK_NOT_AVAILABLE) || hasCode(error, DEADLOCK_DETECTED)) return false;
                  throw error;
                },
              ),
            MIGRATIONS_WAIT,
            `a table they change has been held by another session (a backup, or the requests of instances still serving) for ${minutes}`,
          );
        } finally {
          // Ending the session releases it too: a connection lost meanwhile must not hide why it failed.
          await client.query('select pg_advisory_unlock($1)', [MIGRATION_LOCK_ID]).catch(() => {});
        }
      } finally {
        await client.end();
      }
    },
    close: () => pool.end(),
    poolStats: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }),
  };
}

/**
 * One connection of the pool, lent until released. The pool listens for the errors of its idle
 * connections only: one lent out whose connection is lost (the database restarted) would emit 'error'
 * with no listener, an uncaught exception that takes the process down. What is sent on it fails with
 * the error anyway; given back, with that error or the caller's, the connection is closed.
 */
async function checkOut(pool: pg.Pool): Promise<{ client: pg.PoolClient; release: (error?: Error) => void }> {
  const client = await pool.connect();
  let lost: Error | undefined;
  const onLost = (error: Error) => {
    lost = error;
  };
  client.on('error', onLost);
  return {
    client,
    release(error) {
      client.removeListener('error', onLost);
      client.release(error ?? lost);
    },
  };
}

/**
 * Embedded PostgreSQL (PGlite). With a directory the data persists there and a lock file keeps a
 * second process out (two writers would corrupt it); without one it lives in memory.
 */
export async function openPglite(dataDir?: string): Promise<Database> {
  let releaseLock = () => {};
  if (dataDir) {
    mkdirSync(dirname(dataDir), { recursive: true, mode: 0o700 });
    releaseLock = await lockPglite(dataDir);
  }
  let client: PGlite;
  try {
    if (dataDir) await prepareFolder(dataDir);
    client = new PGlite(dataDir);
    await client.waitReady;
  } catch (error) {
    releaseLock();
    throw dataDir && !(error instanceof StartupError) ? new EmbeddedDatabaseError(dataDir, error) : error;
  }
  const db = drizzlePglite(client, { schema });
  return {
    kind: 'pglite',
    db: db as unknown as Db,
    hold: async () => ({ db: db as unknown as Db, release: () => {} }),
    // PGlite's own: it keeps every other statement of the process out until the transaction ends.
    transaction: (work) => db.transaction((tx) => work(tx as unknown as Db)),
    ping: (timeoutMs = 2_000) => withTimeout(db.execute(sql`select 1`).then(() => undefined), timeoutMs),
    migrate: () => migrating(migratePglite(db, { migrationsFolder })),
    async close() {
      try {
        await client.close();
      } finally {
        releaseLock();
      }
    },
  };
}

/**
 * The embedded database's folder, made or settled under its lock: a restore that holds the lock may be
 * between the renames of its swap. One cut there (killed) had changed nothing else yet, so the database
 * as it was goes back in its place (`settleCutSwap`).
 */
async function prepareFolder(dataDir: string): Promise<void> {
  await settleCutSwap(dataDir, 'back');
  // PGlite writes its files readable and writable by everyone (0666): only its folder keeps other
  // local users out, as PostgreSQL insists of its own. One made before this was 0755.
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  chmodSync(dataDir, 0o700);
}

export async function openDatabase(config: { DATABASE_URL?: string | undefined; DATABASE_QUERY_TIMEOUT_MS?: number; DATA_DIR: string }): Promise<Database> {
  return config.DATABASE_URL
    ? openPostgres(config.DATABASE_URL, { queryTimeoutMs: config.DATABASE_QUERY_TIMEOUT_MS })
    : openPglite(pgliteFolder(config.DATA_DIR));
}

/** The embedded database's folder under DATA_DIR. */
export const pgliteFolder = (dataDir: string) => join(dataDir, 'pglite');

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`database did not answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
