import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import { DatabaseLockedError, openPglite } from '../../src/db/database.js';
import { users } from '../../src/db/schema.js';

describe('embedded PGlite on disk', () => {
  it('keeps data across reopen and applies migrations once', async () => {
    const dir = join(mkdtempSync(join(tmpdir(), 'chatbot-pglite-')), 'pglite');
    const first = await openPglite(dir);
    await first.migrate();
    const now = new Date();
    await first.db.insert(users).values({ id: '01930000-0000-7000-8000-000000000001', email: 'a@example.com', passwordHash: 'x', name: 'A', createdAt: now, updatedAt: now });
    await first.close();

    const second = await openPglite(dir);
    await second.migrate();
    const rows = await second.db.select().from(users);
    expect(rows.map((r) => r.email)).toEqual(['a@example.com']);
    const applied = (await second.db.execute(sql`select count(*)::int as n from drizzle.__drizzle_migrations`)) as unknown as {
      rows: { n: number }[];
    };
    expect(applied.rows[0]!.n).toBeGreaterThanOrEqual(2);
    await second.close();
  });

  it('refuses a folder locked by a live process and takes over a lock whose process has exited', async () => {
    const dir = join(mkdtempSync(join(tmpdir(), 'chatbot-pglite-')), 'pglite');
    const lockFile = join(dir, '..', 'pglite.lock');
    // Our parent process certainly runs (two servers on one folder are tested in server.test.ts).
    writeFileSync(lockFile, String(process.ppid));
    await expect(openPglite(dir)).rejects.toBeInstanceOf(DatabaseLockedError);

    const exited = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    writeFileSync(lockFile, String(exited.stdout));
    const reopened = await openPglite(dir);
    await reopened.close();
  });
});
