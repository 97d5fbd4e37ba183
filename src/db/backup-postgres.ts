import { spawn } from 'node:child_process';
import { accessSync, constants, readdirSync } from 'node:fs';
import { once } from 'node:events';
import { delimiter, join } from 'node:path';
import { getTableName } from 'drizzle-orm';
import pg from 'pg';
import { parse as parseConnectionString } from 'pg-connection-string';
import { files } from './schema.js';
import { BackupError, type DatabaseStore, NAMED_FILES, type NamedFile } from './backup-store.js';

/**
 * PostgreSQL through its own client tools: pg_dump's custom format, restored by pg_restore. The tools
 * must be at least the server's version (pg_dump refuses a newer server).
 */
export function postgresStore(url: string): DatabaseStore {
  return {
    kind: 'postgres',
    fileName: 'database.dump',
    dump: (file, alongside) =>
      withFileRowsFrozen(url, async (snapshot, named) => {
        // Its locks wait for nothing longer than ours did: a statement queued for a table (a migration's
        // ALTER) behind our lock would otherwise wait for us while pg_dump waits for it, a deadlock
        // through this process that PostgreSQL cannot see.
        const lockWait = `--lock-wait-timeout=${LOCK_WAIT_MS}`;
        await runClientTool('pg_dump', url, ['--format=custom', `--snapshot=${snapshot}`, lockWait, `--file=${file}`]);
        await alongside(named);
      }),
    // --clean drops every object of the backup before re-creating it, and one transaction means a restore
    // that fails leaves the database as it was. Objects end up owned by the restoring user (the
    // application's own) and without the source's grants, whose roles need not exist on this server.
    check: (file) => refuseBackupOlderThanSchema(url, file),
    async restore(file, committing) {
      await runClientTool('pg_restore', url, ['--clean', '--if-exists', '--single-transaction', '--no-owner', '--no-privileges', file]);
      await committing();
    },
  };
}

/** How long the check before a restore waits for the database to take its connection. */
const CONNECT_TIMEOUT_MS = 10_000;

/** How long a backup waits for a lock (writes to `files` in progress, a table pg_dump reads) before it fails. */
const LOCK_WAIT_MS = 60_000;

/**
 * Runs `use` with a snapshot exported by a transaction that holds the files table in SHARE mode until
 * `use` ends. Meanwhile file rows can be neither inserted nor deleted (those statements wait; reads go
 * on), and a delete removes its row before the bytes, so every file row of a dump taken with that
 * snapshot still has its bytes on disk while `use` copies them. An upload writes its bytes before its
 * row: the copy may hold bytes whose row waits, which no row of the backup names. `use` is told too
 * which files the snapshot names.
 */
async function withFileRowsFrozen(url: string, use: (snapshot: string, named: NamedFile[]) => Promise<void>): Promise<void> {
  const client = new pg.Client({ connectionString: url, application_name: 'chatbot-platform backup' });
  // A connection lost while idle is an 'error' event, which would end the process; the next query fails instead.
  client.on('error', () => {});
  // One closed by the server as it starts (a proxy whose database is down) has ended: a query or end()
  // on it would never settle.
  let ended = false;
  client.once('end', () => (ended = true));
  const snapshot = async () => {
    await client.connect();
    await client.query('begin isolation level repeatable read');
    await client.query(`set local lock_timeout = ${LOCK_WAIT_MS}`);
    // The transaction sits idle while pg_dump runs and the files are copied: a database or role that
    // bounds idle transactions or statements (managed services do) would end it, and the backup with it.
    await client.query('set local idle_in_transaction_session_timeout = 0');
    await client.query('set local statement_timeout = 0');
    // Before any statement that takes the transaction's snapshot: a snapshot taken before the lock was
    // granted could miss a file row committed while the lock waited.
    await client.query(`lock table ${client.escapeIdentifier(getTableName(files))} in share mode`);
    const { rows } = await client.query<{ snapshot: string }>('select pg_export_snapshot() as snapshot');
    const named = await client.query<NamedFile>(NAMED_FILES);
    return { id: rows[0]!.snapshot, named: named.rows };
  };
  try {
    const exported = await snapshot().catch((error: Error) => {
      throw new BackupError(`Could not take the database's snapshot with the files table held: ${error.message}`);
    });
    await use(exported.id, exported.named);
    await client.query('commit');
  } catch (error) {
    // The connection may be what failed; ending it rolls back anyway.
    if (!ended) await client.query('rollback').catch(() => {});
    throw error;
  } finally {
    if (!ended) await client.end();
  }
}

async function runClientTool(name: string, url: string, args: string[]): Promise<void> {
  const { environment, dbname } = libpqConnection(url);
  await clientToolOutput(name, [...args, `--dbname=${dbname}`], environment);
}

/** What a PostgreSQL client tool run with `args` writes to its standard output; a BackupError saying why when it fails. */
async function clientToolOutput(name: string, args: string[], environment: Record<string, string> = {}): Promise<string> {
  const child = spawn(findClientTool(name), args, { env: { ...process.env, ...environment }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const [code] = (await once(child, 'close')) as [number | null];
  if (code !== 0) {
    const reason = stderr.replace(/\s+/g, ' ').trim() || `exit code ${code}`;
    throw new BackupError(`${name} failed: ${reason}`);
  }
  return stdout;
}

/**
 * Refuses, before anything changes, a backup older than the database's schema: a foreign key that a later
 * migration added to one of the backup's tables (0014's, from `idempotency_keys` to `projects`) is none
 * of the backup's objects, and `pg_restore --clean`, dropping the backup's tables, failed on it ("cannot
 * drop constraint projects_pkey … because other objects depend on it"), which said neither why nor what
 * to do. Read from the archive's table of contents (`pg_restore --list`) and the database's catalog.
 */
async function refuseBackupOlderThanSchema(url: string, file: string): Promise<void> {
  const contents = await clientToolOutput('pg_restore', ['--list', file]);
  // `215; 1259 16385 TABLE public users owner`, `3255; 2606 16475 FK CONSTRAINT public files files_project_id_fkey owner`.
  const listed = (entry: RegExp) => new Set([...contents.matchAll(entry)].map((found) => found.slice(1).join('.')));
  const tables = listed(/^\d+; \d+ \d+ TABLE (?!DATA )(\S+) (\S+) /gm);
  const keys = listed(/^\d+; \d+ \d+ FK CONSTRAINT (\S+) (\S+) (\S+) /gm);
  const client = new pg.Client({ connectionString: url, application_name: 'chatbot-platform restore', connectionTimeoutMillis: CONNECT_TIMEOUT_MS });
  client.on('error', () => {});
  let foreignKeys: { key: string; references: string }[];
  try {
    await client.connect();
    ({ rows: foreignKeys } = await client.query<{ key: string; references: string }>(
      `select n.nspname || '.' || c.relname || '.' || k.conname as key, rn.nspname || '.' || r.relname as references
         from pg_constraint k join pg_class c on c.oid = k.conrelid join pg_namespace n on n.oid = c.relnamespace
         join pg_class r on r.oid = k.confrelid join pg_namespace rn on rn.oid = r.relnamespace
        where k.contype = 'f' and k.conparentid = 0`,
    ));
  } catch (error) {
    throw new BackupError(`Could not read the database's schema: ${(error as Error).message}`);
  } finally {
    await client.end().catch(() => {});
  }
  const later = foreignKeys.filter((row) => tables.has(row.references) && !keys.has(row.key)).map((row) => row.key);
  if (later.length === 0) return;
  throw new BackupError(
    `Nothing was restored: the backup is older than this database's schema (${later.join(', ')} came with a later migration). ` +
      'Restore it into an empty database (createdb, with DATABASE_URL naming it): the service applies the later migrations when it starts.',
  );
}

/** What the Node driver reads of a URL, and the environment variable libpq reads it from. */
const LIBPQ_VARIABLES: Record<string, string> = {
  host: 'PGHOST',
  port: 'PGPORT',
  user: 'PGUSER',
  password: 'PGPASSWORD',
  sslrootcert: 'PGSSLROOTCERT',
  sslcert: 'PGSSLCERT',
  sslkey: 'PGSSLKEY',
  options: 'PGOPTIONS',
  application_name: 'PGAPPNAME',
  connect_timeout: 'PGCONNECT_TIMEOUT',
};

/**
 * How pg_dump and pg_restore (libpq) reach the database of `url`, read as the service's driver reads
 * it: in their environment, and on their command line (which every local user can read) only the
 * database's name. Handed the URL itself, libpq refused what only the Node driver knows
 * (`sslmode=no-verify`, `ssl=true`, `uselibpqcompat`), and `new URL` a host given as a parameter
 * (Cloud SQL's `user:password@/db?host=/cloudsql/…`); a `?password=` went on the command line.
 * SSL modes keep libpq's meaning: `require` encrypts without checking the certificate (the Node driver
 * checks it unless `uselibpqcompat=true`), and `no-verify` is taken as `require`.
 */
export function libpqConnection(url: string): { environment: Record<string, string>; dbname: string } {
  const config = parseConnectionString(url) as Record<string, unknown>;
  const text = (key: string) => (typeof config[key] === 'string' && config[key] !== '' ? (config[key] as string) : undefined);
  const environment: Record<string, string> = {};
  for (const [key, variable] of Object.entries(LIBPQ_VARIABLES)) {
    const value = text(key);
    if (value) environment[variable] = value;
  }
  const mode = sslMode(text('sslmode'), config.ssl);
  if (mode) environment.PGSSLMODE = mode;
  // A conninfo string (it holds `=`), so that no name is taken for anything else; as the driver, the user's name by default.
  const database = text('database') ?? text('user');
  return { environment, dbname: database ? `dbname='${database.replace(/[\\']/g, '\\$&')}'` : '' };
}

/** libpq's mode for the driver's `sslmode`, or its `ssl` as parsed (`true` for `ssl=true` or `1`, `false` for `0`). */
function sslMode(mode: string | undefined, ssl: unknown): string | undefined {
  if (mode === 'no-verify') return 'require';
  if (mode) return mode;
  if (ssl === true) return 'require';
  if (ssl === false || ssl === 'false') return 'disable';
  return undefined;
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
