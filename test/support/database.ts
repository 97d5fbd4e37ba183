import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { type Database, openPglite, openPostgres } from '../../src/db/database.js';

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
