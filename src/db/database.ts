import { chmodSync, closeSync, mkdirSync, openSync, readFileSync, readlinkSync, rmSync, statSync, utimesSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { sql } from 'drizzle-orm';
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { migrate as migratePg } from 'drizzle-orm/node-postgres/migrator';
import type { PgDatabase, PgQueryResultHKT } from 'drizzle-orm/pg-core';
import { drizzle as drizzlePglite } from 'drizzle-orm/pglite';
import { migrate as migratePglite } from 'drizzle-orm/pglite/migrator';
import pg from 'pg';
import { schema } from './schema.js';

export type Db = PgDatabase<PgQueryResultHKT, typeof schema>;

/** One interface over a PostgreSQL pool and embedded PGlite, so nothing above this file can tell them apart. */
export interface Database {
  readonly kind: 'postgres' | 'pglite';
  readonly db: Db;
  /** Resolves when the database answers a trivial query within `timeoutMs`; rejects otherwise. */
  ping(timeoutMs?: number): Promise<void>;
  migrate(): Promise<void>;
  close(): Promise<void>;
  /** Connections of the PostgreSQL pool, for metrics; embedded PGlite has no pool. */
  readonly poolStats?: () => PoolStats;
  /**
   * One connection, held until released: what is sent on its `db` runs in the order sent, each
   * statement leaving the moment the one before is answered, with no round trip through the caller in
   * between. Embedded PGlite has one connection, and lends it as it is.
   */
  hold(): Promise<HeldConnection>;
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

/** Chosen at random once; every instance migrating the same database takes this advisory lock first. */
const MIGRATION_LOCK_ID = 7_202_611_240;

export class DatabaseLockedError extends Error {
  override name = 'DatabaseLockedError';
}

export interface PostgresOptions {
  /** Pool size; PostgreSQL's default of 100 connections is shared by every instance. */
  max?: number;
  connectionTimeoutMs?: number;
}

export function openPostgres(url: string, options: PostgresOptions = {}): Database {
  const pool = new pg.Pool({
    connectionString: url,
    max: options.max ?? 20,
    // A request waiting on a dead database fails fast with 503 instead of hanging.
    connectionTimeoutMillis: options.connectionTimeoutMs ?? 5_000,
    idleTimeoutMillis: 30_000,
  });
  // An idle client losing its connection (database restarted) must not crash the process;
  // the pool drops it and the next query opens a new one.
  pool.on('error', () => {});
  const db = drizzlePg(pool, { schema }) as unknown as Db;
  // The pool keeps its connections: each gets its drizzle instance once.
  const onConnection = new WeakMap<pg.PoolClient, Db>();
  return {
    kind: 'postgres',
    db,
    async hold() {
      const { client, release } = await checkOut(pool);
      let held = onConnection.get(client);
      if (!held) onConnection.set(client, (held = drizzlePg(client, { schema }) as unknown as Db));
      return { db: held, release };
    },
    ping: (timeoutMs = 2_000) => withTimeout(pool.query('select 1').then(() => undefined), timeoutMs),
    async migrate() {
      const { client, release } = await checkOut(pool);
      try {
        await client.query('select pg_advisory_lock($1)', [MIGRATION_LOCK_ID]);
        try {
          await migratePg(drizzlePg(client), { migrationsFolder });
        } finally {
          await client.query('select pg_advisory_unlock($1)', [MIGRATION_LOCK_ID]);
        }
      } finally {
        release();
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
    // PGlite writes its files readable and writable by everyone (0666): only its folder keeps other
    // local users out, as PostgreSQL insists of its own. One made before this was 0755.
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    chmodSync(dataDir, 0o700);
    releaseLock = lockPglite(dataDir);
  }
  let client: PGlite;
  try {
    client = new PGlite(dataDir);
    await client.waitReady;
  } catch (error) {
    releaseLock();
    throw error;
  }
  const db = drizzlePglite(client, { schema });
  return {
    kind: 'pglite',
    db: db as unknown as Db,
    hold: async () => ({ db: db as unknown as Db, release: () => {} }),
    ping: (timeoutMs = 2_000) => withTimeout(db.execute(sql`select 1`).then(() => undefined), timeoutMs),
    migrate: () => migratePglite(db, { migrationsFolder }),
    async close() {
      try {
        await client.close();
      } finally {
        releaseLock();
      }
    },
  };
}

export async function openDatabase(config: { DATABASE_URL?: string | undefined; DATA_DIR: string }): Promise<Database> {
  return config.DATABASE_URL ? openPostgres(config.DATABASE_URL) : openPglite(pgliteFolder(config.DATA_DIR));
}

/** The embedded database's folder under DATA_DIR. */
export const pgliteFolder = (dataDir: string) => join(dataDir, 'pglite');

/**
 * Keeps every other process (a server, a backup, a restore) off an embedded database folder until the
 * returned release is called; throws DatabaseLockedError while a live process holds it.
 */
export function lockPglite(dataDir: string): () => void {
  return acquireLock(join(dataDir, '..', 'pglite.lock'));
}

/** How often a holder touches its lock file, and how long untouched until it counts as left behind. */
const LOCK_REFRESH_MS = 5_000;
const LOCK_STALE_MS = 60_000;

/**
 * The PID namespace this process's pid is counted in. Each container has its own, where the server is
 * typically pid 1: a process in another one (a backup run in a second container on the same volume)
 * could neither tell whether the holder lives nor tell its pid from its own.
 */
function pidNamespace(): string {
  try {
    return readlinkSync('/proc/self/ns/pid');
  } catch {
    return ''; // not Linux: one namespace
  }
}

function acquireLock(lockFile: string): () => void {
  const namespace = pidNamespace();
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(lockFile, 'wx');
      writeSync(fd, `${process.pid} ${namespace}`.trim());
      closeSync(fd);
      // Its age is what tells a holder in another namespace from one that is gone.
      const refresh = setInterval(() => {
        const now = new Date();
        try {
          utimesSync(lockFile, now, now);
        } catch {
          // removed by hand: nothing to keep fresh
        }
      }, LOCK_REFRESH_MS).unref();
      return () => {
        clearInterval(refresh);
        rmSync(lockFile, { force: true });
      };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      const [pid, holderNamespace = namespace] = readFileSync(lockFile, 'utf8').trim().split(' ');
      const holder = Number(pid);
      const held =
        holderNamespace === namespace
          ? isAlive(holder) && holder !== process.pid
          : Date.now() - statSync(lockFile).mtimeMs < LOCK_STALE_MS;
      if (held) {
        const where = holderNamespace === namespace ? '' : ' in another PID namespace (a container), or was until less than a minute ago';
        throw new DatabaseLockedError(
          `The embedded database is in use by process ${holder}${where} (lock file ${lockFile}); stop it or set another DATA_DIR`,
        );
      }
      // A lock left by a process that no longer runs (or was taken before by ourselves): take it over.
      rmSync(lockFile, { force: true });
    }
  }
  throw new DatabaseLockedError(`Could not take the lock ${lockFile}`);
}

function isAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`database did not answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
