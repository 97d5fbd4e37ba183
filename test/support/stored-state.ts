import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { sql } from 'drizzle-orm';
import type { Db } from '../../src/db/database.js';

/**
 * Columns that hold what is counted from the rest of their row, not what anyone stored: a prompt's
 * tokens are written back by the first turn that counts them, a turn refused for a context too long
 * included, so that the next such turn is refused without counting them again.
 */
const DERIVED: Record<string, string[]> = { prompts: ['tokens', 'token_encoding'] };

/**
 * A fingerprint of everything the service stores: per table of the database, its row count and an md5 of
 * all its rows (every table of the `public` schema, found when made, so a new table is covered with no
 * step of its own, all in one statement), but for the DERIVED columns; and the files under the data
 * folder, by path, size and SHA-256. Two equal fingerprints mean nothing stored changed, not even an
 * `updated_at`.
 */
export async function storedStateReader(db: Db, dataDir: string): Promise<() => Promise<Record<string, string>>> {
  const tables = rowsOf<{ table_name: string }>(
    await db.execute(sql`select table_name from information_schema.tables
      where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`),
  ).map((row) => row.table_name);
  if (tables.length === 0) throw new Error('no tables to fingerprint');
  const columns = tables.map((table) => {
    const derived = DERIVED[table];
    const row = derived ? `(to_jsonb(t) - array[${derived.map((column) => `'${column}'`).join(', ')}])::text` : 't::text';
    return `(select count(*) || ':' || coalesce(md5(string_agg(${row}, E'\\n' order by ${row})), '') from "${table}" t) as "${table}"`;
  });
  const statement = sql.raw(`select ${columns.join(', ')}`);
  return async () => {
    const [row] = rowsOf<Record<string, string>>(await db.execute(statement));
    return { ...row, files: await filesFingerprint(dataDir) };
  };
}

function rowsOf<Row>(result: unknown): Row[] {
  return (Array.isArray(result) ? result : (result as { rows: Row[] }).rows) as Row[];
}

async function filesFingerprint(root: string): Promise<string> {
  const entries = await readdir(root, { recursive: true, withFileTypes: true });
  const files = entries.filter((entry) => entry.isFile()).map((entry) => join(entry.parentPath, entry.name));
  const hash = createHash('md5');
  for (const path of files.sort()) {
    const bytes = await readFile(path);
    hash.update(`${relative(root, path)}:${bytes.length}:${createHash('sha256').update(bytes).digest('hex')}\n`);
  }
  return `${files.length}:${hash.digest('hex')}`;
}
