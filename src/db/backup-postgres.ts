import { spawn } from 'node:child_process';
import { accessSync, constants, readdirSync } from 'node:fs';
import { once } from 'node:events';
import { delimiter, join } from 'node:path';
import { getTableName } from 'drizzle-orm';
import pg from 'pg';
import { files } from './schema.js';
import { BackupError, type DatabaseStore } from './backup-store.js';

/**
 * PostgreSQL through its own client tools: pg_dump's custom format, restored by pg_restore. The tools
 * must be at least the server's version (pg_dump refuses a newer server).
 */
export function postgresStore(url: string): DatabaseStore {
  return {
    kind: 'postgres',
    fileName: 'database.dump',
    dump: (file, alongside) =>
      withFileRowsFrozen(url, async (snapshot) => {
        // Its locks wait for nothing longer than ours did: a statement queued for a table (a migration's
        // ALTER) behind our lock would otherwise wait for us while pg_dump waits for it, a deadlock
        // through this process that PostgreSQL cannot see.
        const lockWait = `--lock-wait-timeout=${LOCK_WAIT_MS}`;
        await runClientTool('pg_dump', url, ['--format=custom', `--snapshot=${snapshot}`, lockWait, `--file=${file}`]);
        await alongside();
      }),
    // --clean drops every object of the backup before re-creating it, and one transaction means a restore
    // that fails leaves the database as it was. Objects end up owned by the restoring user (the
    // application's own) and without the source's grants, whose roles need not exist on this server.
    restore: (file) =>
      runClientTool('pg_restore', url, ['--clean', '--if-exists', '--single-transaction', '--no-owner', '--no-privileges', file]),
  };
}

/** How long a backup waits for a lock (writes to `files` in progress, a table pg_dump reads) before it fails. */
const LOCK_WAIT_MS = 60_000;

/**
 * Runs `use` with a snapshot exported by a transaction that holds the files table in SHARE mode until
 * `use` ends. Meanwhile file rows can be neither inserted nor deleted (those statements wait; reads go
 * on), and a delete removes its row before the bytes, so every file row of a dump taken with that
 * snapshot still has its bytes on disk while `use` copies them. An upload writes its bytes before its
 * row: the copy may hold bytes whose row waits, which no row of the backup names.
 */
async function withFileRowsFrozen(url: string, use: (snapshot: string) => Promise<void>): Promise<void> {
  const client = new pg.Client({ connectionString: url, application_name: 'chatbot-platform backup' });
  // A connection lost while idle is an 'error' event, which would end the process; the next query fails instead.
  client.on('error', () => {});
  const snapshot = async () => {
    await client.connect();
    await client.query('begin isolation level repeatable read');
    await client.query(`set local lock_timeout = ${LOCK_WAIT_MS}`);
    // Before any statement that takes the transaction's snapshot: a snapshot taken before the lock was
    // granted could miss a file row committed while the lock waited.
    await client.query(`lock table ${client.escapeIdentifier(getTableName(files))} in share mode`);
    const { rows } = await client.query<{ snapshot: string }>('select pg_export_snapshot() as snapshot');
    return rows[0]!.snapshot;
  };
  try {
    const exported = await snapshot().catch((error: Error) => {
      throw new BackupError(`Could not take the database's snapshot with the files table held: ${error.message}`);
    });
    await use(exported);
    await client.query('commit');
  } catch (error) {
    // The connection may be what failed; ending it rolls back anyway.
    await client.query('rollback').catch(() => {});
    throw error;
  } finally {
    await client.end();
  }
}

async function runClientTool(name: string, url: string, args: string[]): Promise<void> {
  // The password travels in the environment: a command line is visible to every local user.
  const connection = new URL(url);
  const password = decodeURIComponent(connection.password);
  connection.password = '';
  const child = spawn(findClientTool(name), [...args, `--dbname=${connection.toString()}`], {
    env: { ...process.env, ...(password ? { PGPASSWORD: password } : {}) },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const [code] = (await once(child, 'close')) as [number | null];
  if (code !== 0) {
    const reason = stderr.replace(/\s+/g, ' ').trim() || `exit code ${code}`;
    throw new BackupError(`${name} failed: ${reason}`);
  }
}

function findClientTool(name: string): string {
  const found = findPostgresTool(name);
  if (!found) {
    throw new BackupError(
      `${name} not found on PATH nor under /usr/lib/postgresql/*/bin: install the PostgreSQL client tools (at least the server's version)`,
    );
  }
  return found;
}

/** A PostgreSQL program: PATH first; else the newest under /usr/lib/postgresql, where Debian keeps them. */
export function findPostgresTool(name: string): string | undefined {
  const folders = [...(process.env.PATH ?? '').split(delimiter).filter(Boolean), ...debianPostgresqlBins()];
  return folders.map((folder) => join(folder, name)).find(isExecutable);
}

function debianPostgresqlBins(): string[] {
  try {
    return readdirSync('/usr/lib/postgresql')
      .sort((a, b) => Number(b) - Number(a))
      .map((version) => join('/usr/lib/postgresql', version, 'bin'));
  } catch {
    return [];
  }
}

function isExecutable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}
