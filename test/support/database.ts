import { randomBytes } from 'node:crypto';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import { type Database, type Db, openPglite, openPostgres } from '../../src/db/database.js';

export interface TestDatabase {
  database: Database;
  /** A connection URL of this database when it is PostgreSQL, for tests that spawn a server process. */
  url?: string;
  drop(): Promise<void>;
}

/**
 * A fresh, migrated, throwaway database: a new database on the PostgreSQL server named by
 * TEST_DATABASE_URL, or an in-memory PGlite without it (so `npm test` runs on a bare laptop).
 */
export async function createTestDatabase(): Promise<TestDatabase> {
  const adminUrl = process.env.TEST_DATABASE_URL;
  if (!adminUrl) {
    const database = await openPglite();
    await database.migrate();
    return { database, drop: () => database.close() };
  }
  const name = `chatbot_test_${randomBytes(6).toString('hex')}`;
  await adminQuery(adminUrl, `create database ${name}`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  const database = openPostgres(url.toString(), { max: 10 });
  await database.migrate();
  return {
    database,
    url: url.toString(),
    async drop() {
      await database.close();
      await adminQuery(adminUrl, `drop database if exists ${name} with (force)`);
    },
  };
}

export async function adminQuery(url: string, statement: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query(statement);
  } finally {
    await client.end();
  }
}

let refusals = 0;

/**
 * Runs `run` while `db` refuses the writes `writes` (`before insert on messages`, say) of the rows that meet
 * `when`, and nothing else, with `error` (a `raise exception` clause: a message, and an errcode to give).
 */
export async function refusingWrites(db: Db, writes: string, run: () => Promise<void>, { when = 'true', error = "'refused'" } = {}): Promise<void> {
  const name = `refuse_write_${++refusals}`;
  await db.execute(sql.raw(`create function ${name}() returns trigger language plpgsql as $$ begin raise exception ${error}; end $$`));
  const [, table] = /\bon (\w+)$/.exec(writes)!;
  await db.execute(sql.raw(`create trigger ${name} ${writes} for each row when (${when}) execute function ${name}()`));
  try {
    await run();
  } finally {
    await db.execute(sql.raw(`drop trigger ${name} on ${table}`));
    await db.execute(sql.raw(`drop function ${name}()`));
  }
}
