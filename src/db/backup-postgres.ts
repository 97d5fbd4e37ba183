import { spawn } from 'node:child_process';
import { accessSync, constants, readdirSync } from 'node:fs';
import { once } from 'node:events';
import { delimiter, join } from 'node:path';
import { BackupError, type DatabaseStore } from './backup-store.js';

/**
 * PostgreSQL through its own client tools: pg_dump's custom format, restored by pg_restore. The tools
 * must be at least the server's version (pg_dump refuses a newer server).
 */
export function postgresStore(url: string): DatabaseStore {
  return {
    kind: 'postgres',
    fileName: 'database.dump',
    dump: (file) => runClientTool('pg_dump', url, ['--format=custom', `--file=${file}`]),
    // --clean drops every object of the backup before re-creating it, and one transaction means a restore
    // that fails leaves the database as it was. Objects end up owned by the restoring user (the
    // application's own) and without the source's grants, whose roles need not exist on this server.
    restore: (file) =>
      runClientTool('pg_restore', url, ['--clean', '--if-exists', '--single-transaction', '--no-owner', '--no-privileges', file]),
  };
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
