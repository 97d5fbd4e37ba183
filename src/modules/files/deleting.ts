import { sql } from 'drizzle-orm';
import type { Db } from '../../db/database.js';
import { files } from '../../db/schema.js';

/**
 * The first statement of a transaction that deletes file rows (with their project or account): waits,
 * holding nothing yet, while a backup holds the files table (SHARE mode, src/db/backup-postgres.ts).
 * Taking its row locks first and then waiting would hold up every write under those rows (a chat's
 * messages, prompts, uploads) until the backup ended.
 */
export async function waitForFileWrites(tx: Pick<Db, 'execute'>): Promise<void> {
  await tx.execute(sql`lock table ${files} in row exclusive mode`);
}
