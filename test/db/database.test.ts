import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { type Database, MIGRATION_LOCK_ID, MigrationError, MIGRATIONS_WAIT, MIGRATIONS_WAIT_FOR_ANOTHER, migrationsFolder, openPglite, openPostgres } from '../../src/db/database.js';
import { uuidv7 } from '../../src/db/ids.js';
import { DatabaseLockedError, lockPglite } from '../../src/db/pglite-lock.js';
import { files, idempotencyKeys, projects, providerFileDeletions, users } from '../../src/db/schema.js';
import { insertMessages } from '../support/app.js';
import { adminQuery, createTestDatabase } from '../support/database.js';

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

  it('keeps its folder to its owner: PGlite writes its files for everyone to read and write', async () => {
    const dir = join(mkdtempSync(join(tmpdir(), 'chatbot-pglite-')), 'pglite');
    for (const made of ['by PGlite', 'before, open to all']) {
      const database = await openPglite(dir);
      await database.close();
      expect(statSync(dir).mode & 0o777, made).toBe(0o700);
      chmodSync(dir, 0o755);
    }
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

    // A holder in another PID namespace (another container) may have our very pid: it holds the lock
    // while it keeps the file fresh, and is taken over once the file is a minute old.
    writeFileSync(lockFile, `${process.pid} pid:[1]`);
    await expect(openPglite(dir)).rejects.toThrow(/in use by process \d+ in another PID namespace \(a container\), or was until less than a minute ago/);
    const aMinuteAgo = new Date(Date.now() - 61_000);
    utimesSync(lockFile, aMinuteAgo, aMinuteAgo);
    const takenOver = await openPglite(dir);
    await takenOver.close();
  });

  const bootId = '/proc/sys/kernel/random/boot_id';
  /** A lock file's text: pid and namespace first, as a reader of an older release reads them. */
  const lockText = (pid: number, namespace: string, details: Record<string, unknown>) => `${pid} ${namespace} ${JSON.stringify(details)}`;
  const readLock = (lockFile: string) => {
    const [pid, namespace, details] = readFileSync(lockFile, 'utf8').split(' ');
    return { pid: Number(pid), namespace, ...(JSON.parse(details!) as { kernel?: string; beacon?: string }) };
  };

  it.runIf(existsSync(bootId))('takes over at once the lock of a holder in another container of this kernel once its beacon is silent, killed or not', async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    const dir = join(folder, 'pglite');
    const beacon = 'pglite.0123456789ab.sock';
    // A holder in another PID namespace on this kernel, pid 1 as in a container, listening on its beacon.
    const holder = spawn(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(join(folder, beacon))}, () => console.log('listening'))`]);
    try {
      await once(holder.stdout, 'data');
      const kernel = readFileSync(bootId, 'utf8').trim();
      writeFileSync(join(folder, 'pglite.lock'), lockText(1, 'pid:[1]', { kernel, beacon }));
      // Seen to live: the lock's age plays no part.
      await expect(openPglite(dir)).rejects.toThrow(/in use by process 1 in another PID namespace \(a container\) \(lock file/);

      // Killed, it leaves its lock fresh and its socket's file behind, but nothing listens on it any more.
      holder.kill('SIGKILL');
      await once(holder, 'exit');
      expect(existsSync(join(folder, beacon))).toBe(true);
      const takenOver = await openPglite(dir);
      expect(existsSync(join(folder, beacon)), "the dead holder's socket removed").toBe(false);
      const ours = readLock(join(folder, 'pglite.lock'));
      expect(ours).toMatchObject({ pid: process.pid, namespace: readlinkSync('/proc/self/ns/pid'), kernel });
      expect(readdirSync(folder).sort()).toEqual(['pglite', 'pglite.lock', ours.beacon].sort());
      await takenOver.close();
      expect(readdirSync(folder), 'the lock and the beacon go with the close').toEqual(['pglite']);
    } finally {
      holder.kill('SIGKILL');
    }
  });

  it.runIf(existsSync(bootId))('takes over at once the lock of a holder killed that its parent has not collected yet (a zombie)', async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    // A parent that never collects its children: sh starts one, then becomes a sleep that never waits.
    const parent = spawn('sh', ['-c', 'sleep 600 & echo $!; exec sleep 600']);
    try {
      const [pid] = (await once(parent.stdout, 'data')) as [Buffer];
      const holder = Number(String(pid).trim());
      // Killed only once sh is the sleep: sh itself collects a child that ends while it still runs, and
      // then no zombie is left (it failed so, now and then, where sh was slow to exec).
      const parentIs = () => readFileSync(`/proc/${parent.pid}/comm`, 'utf8').trim();
      for (let wait = 0; wait < 100 && parentIs() !== 'sleep'; wait++) await sleep(10);
      expect(parentIs()).toBe('sleep');
      process.kill(holder, 'SIGKILL');
      const state = () => readFileSync(`/proc/${holder}/stat`, 'utf8').split(') ')[1]![0];
      for (let wait = 0; wait < 100 && state() !== 'Z'; wait++) await sleep(10);
      expect(state()).toBe('Z');
      const kernel = readFileSync(bootId, 'utf8').trim();
      writeFileSync(join(folder, 'pglite.lock'), lockText(holder, readlinkSync('/proc/self/ns/pid'), { kernel }));
      const release = await lockPglite(join(folder, 'pglite'));
      expect(readLock(join(folder, 'pglite.lock')).pid).toBe(process.pid);
      release();
    } finally {
      parent.kill('SIGKILL');
    }
  });

  it('takes its lock without a socket where the path would be too long for one, rather than under a name cut short', async () => {
    const folder = join(mkdtempSync(join(tmpdir(), 'chatbot-pglite-')), 'd'.repeat(70));
    const database = await openPglite(join(folder, 'pglite'));
    expect(readdirSync(folder).sort()).toEqual(['pglite', 'pglite.lock']);
    expect(readLock(join(folder, 'pglite.lock'))).not.toHaveProperty('beacon');
    await database.close();
    expect(readdirSync(folder)).toEqual(['pglite']);
  });

  it.runIf(existsSync(bootId))('lets one process alone take over a lock left behind, however many try at once', { timeout: 120_000 }, async () => {
    // Processes that each take the lock once told to, hold it a moment and say whether they had it.
    const taker = `
      const { lockPglite } = await import(${JSON.stringify(new URL('../../src/db/pglite-lock.ts', import.meta.url).href)});
      console.log('ready');
      process.stdin.once('data', async (startAt) => {
        while (Date.now() < Number(startAt)) {}
        try {
          const release = await lockPglite(process.argv[1]);
          console.log('held');
          setTimeout(release, 1_000);
        } catch (error) {
          console.log(error.name);
        }
      });`;
    for (let round = 0; round < 3; round++) {
      const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
      // Left by a process of this namespace that has exited: any taker may take it over.
      const exited = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
      const kernel = readFileSync(bootId, 'utf8').trim();
      writeFileSync(join(folder, 'pglite.lock'), lockText(Number(exited.stdout), readlinkSync('/proc/self/ns/pid'), { kernel }));
      const takers = Array.from({ length: 8 }, () =>
        spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', taker, join(folder, 'pglite')], { stdio: ['pipe', 'pipe', 'inherit'] }),
      );
      const said = takers.map((child) => {
        let output = '';
        child.stdout.on('data', (chunk: Buffer) => (output += String(chunk)));
        return async () => {
          await once(child, 'exit');
          return output;
        };
      });
      // Once every one is loaded, told a moment to start at: they judge the lock at the same time.
      await Promise.all(takers.map((child) => once(child.stdout, 'data')));
      const startAt = Date.now() + 500;
      for (const child of takers) child.stdin.end(String(startAt));
      const outputs = await Promise.all(said.map((output) => output()));
      expect(outputs.every((output) => /^ready\n(held|DatabaseLockedError)\n$/.test(output)), outputs.join('|')).toBe(true);
      expect(outputs.filter((output) => output.includes('held')), `round ${round}`).toHaveLength(1);
    }
  });

  it.runIf(existsSync(bootId))('takes over a lock whose takeover mark a taker left behind a minute ago, and no sooner', async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    const lockFile = join(folder, 'pglite.lock');
    const exited = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    const kernel = readFileSync(bootId, 'utf8').trim();
    const text = lockText(Number(exited.stdout), readlinkSync('/proc/self/ns/pid'), { kernel });
    writeFileSync(lockFile, text);
    // The mark of a taker of that lock, named as takers name it: killed while it held it, or still holding it.
    const mark = `${lockFile}.${createHash('sha256').update(text).digest('hex').slice(0, 16)}.takeover`;
    writeFileSync(mark, 'a taker');
    await expect(lockPglite(join(folder, 'pglite'))).rejects.toThrow(/Could not take the lock/);
    const aMinuteAgo = new Date(Date.now() - 61_000);
    utimesSync(mark, aMinuteAgo, aMinuteAgo);
    const release = await lockPglite(join(folder, 'pglite'));
    expect(readdirSync(folder).filter((name) => name.endsWith('.takeover'))).toEqual([]);
    release();
  });

  it.runIf(existsSync(bootId))('takes the lock or refuses it, and fails no other way, while the lock it judges is removed and made again', { timeout: 30_000 }, async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    const lockFile = join(folder, 'pglite.lock');
    // A holder in another container of this kernel whose beacon is gone: the lock is judged by its age, and
    // only once the beacon has been called, long enough for another process to remove the lock meanwhile.
    const kernel = readFileSync(bootId, 'utf8').trim();
    writeFileSync(join(folder, 'held'), lockText(1, 'pid:[1]', { kernel, beacon: 'pglite.000000000000.sock' }));
    // Another process that makes the lock and removes it (releases it, or takes it over) without pause.
    const churner = spawn(process.execPath, [
      '-e',
      `const fs = require('node:fs');
      console.log('churning');
      for (;;) {
        try { fs.linkSync(process.argv[1], process.argv[2]); } catch {}
        fs.rmSync(process.argv[2], { force: true });
      }`,
      join(folder, 'held'),
      lockFile,
    ]);
    try {
      await once(churner.stdout, 'data');
      for (let attempt = 0; attempt < 300; attempt++) {
        try {
          const release = await lockPglite(join(folder, 'pglite'));
          release();
        } catch (error) {
          if (!(error instanceof DatabaseLockedError)) throw error;
        }
      }
    } finally {
      churner.kill('SIGKILL');
    }
  });

  it.runIf(existsSync(bootId))("removes, taking over a lock, the holder's beacon only as a socket nothing listens on", async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    const lockFile = join(folder, 'pglite.lock');
    const kernel = readFileSync(bootId, 'utf8').trim();
    const exited = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    // The lock's text is a claim of a process gone: what it names as its beacon may be another's.
    const listened = 'pglite.0123456789ab.sock';
    const listener = spawn(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(join(folder, listened))}, () => console.log('listening'))`]);
    const notSocket = 'pglite.ba5eba11ba5e.sock';
    mkdirSync(join(folder, notSocket));
    try {
      await once(listener.stdout, 'data');
      for (const beacon of [listened, notSocket]) {
        writeFileSync(lockFile, lockText(Number(exited.stdout), readlinkSync('/proc/self/ns/pid'), { kernel, beacon }));
        const release = await lockPglite(join(folder, 'pglite'));
        expect(existsSync(join(folder, beacon)), beacon).toBe(true);
        release();
      }
    } finally {
      listener.kill('SIGKILL');
    }
  });

  it('neither keeps fresh nor removes, released, a lock that is no longer its own: the lock of a process that took it over', { timeout: 20_000 }, async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    const lockFile = join(folder, 'pglite.lock');
    const release = await lockPglite(join(folder, 'pglite'));
    // Stalled past the lock's staleness on another machine, this process was taken over meanwhile, and
    // the taker has stopped too: its lock must age, as it would without us.
    const taker = lockText(4242, 'pid:[4026531836]', { kernel: 'another-boot' });
    writeFileSync(lockFile, taker);
    const aMinuteAgo = new Date(Date.now() - 61_000);
    utimesSync(lockFile, aMinuteAgo, aMinuteAgo);
    await sleep(5_500); // past a refresh (every 5 s)
    expect(statSync(lockFile).mtimeMs).toBeLessThan(Date.now() - 60_000);
    release();
    expect(readFileSync(lockFile, 'utf8')).toBe(taker);
    expect(readdirSync(folder).filter((name) => name.endsWith('.takeover'))).toEqual([]);
  });

  it.runIf(existsSync(bootId))('judges the lock of a holder on another kernel (a volume shared over the network), or of one it cannot read, by its age alone', async () => {
    const folder = mkdtempSync(join(tmpdir(), 'chatbot-pglite-'));
    const lockFile = join(folder, 'pglite.lock');
    // A pid that runs here, in our very namespace: on the holder's machine it is another process, or none.
    for (const details of [{ kernel: 'another-boot' }, { kernel: 7 }, {}]) {
      writeFileSync(lockFile, lockText(process.ppid, readlinkSync('/proc/self/ns/pid'), details));
      await expect(openPglite(join(folder, 'pglite')), JSON.stringify(details)).rejects.toThrow(
        /in use by process \d+ on another machine, or was until less than a minute ago/,
      );
    }
    const aMinuteAgo = new Date(Date.now() - 61_000);
    utimesSync(lockFile, aMinuteAgo, aMinuteAgo);
    const takenOver = await openPglite(join(folder, 'pglite'));
    await takenOver.close();
  });
});

describe('migrations', () => {
  it('run again, and cleanly, after a restore of a backup taken before them, which leaves their new objects behind', async () => {
    const { database, drop } = await createTestDatabase();
    try {
      const { db } = database;
      // What pg_restore --clean of such a backup leaves: the migrations' record as it was then, their
      // new functions and tables still there (the backup had none to drop), a queued copy among them.
      await db.insert(providerFileDeletions).values({ providerFileId: 'file-queued-after-the-backup' });
      // Every migration after 0004 (the first five), which are written to run again.
      await db.execute(sql`delete from drizzle.__drizzle_migrations where id not in (select id from drizzle.__drizzle_migrations order by created_at limit 5)`);
      await database.migrate();
      // The queue starts empty: its copies were those of files the backup has again.
      expect(await db.select().from(providerFileDeletions)).toEqual([]);
      const applied = (await db.execute(sql`select count(*)::int as n from drizzle.__drizzle_migrations`)) as unknown as { rows: { n: number }[] };
      expect(applied.rows[0]!.n).toBe(readdirSync(migrationsFolder).filter((name) => name.endsWith('.sql')).length);
    } finally {
      await drop();
    }
  });
});

describe('0017: the provider copies that file rows name', () => {
  // A copy is queued when it is made, due a day later; left there once its row was written, the sweep of an
  // instance of before the queue looked for no row and deleted a live file's copy.
  it('leaves the deletion queue: queued ones when it runs, and each later one in the insert of its row', async () => {
    const { database, drop } = await createTestDatabase();
    try {
      const { db } = database;
      const userId = uuidv7();
      const projectId = uuidv7();
      await db.insert(users).values({ id: userId, email: `${userId}@example.com`, passwordHash: 'x', name: 'A' });
      await db.insert(projects).values({ id: projectId, userId, name: 'p' });
      const file = (providerFileId: string) => ({ id: uuidv7(), projectId, filename: 'a.txt', mimeType: 'text/plain', size: 1, sha256: 'x', storageUrl: 'x', providerFileId });
      const reserve = (providerFileId: string) => db.insert(providerFileDeletions).values({ providerFileId, dueAt: sql`now() + interval '1 day'` });
      const queued = async () => (await db.select({ id: providerFileDeletions.providerFileId }).from(providerFileDeletions)).map((row) => row.id).sort();
      // Named before the trigger (this code, before 0017), as the migration finds them; and one of no row.
      await db.execute(sql`drop trigger files_provider_copy_named on files`);
      await reserve('file-named-before');
      await db.insert(files).values(file('file-named-before'));
      await reserve('file-of-no-row');
      // 0017 and those after it applied again, as to a database of before it.
      await db.execute(sql`delete from drizzle.__drizzle_migrations where id not in (select id from drizzle.__drizzle_migrations order by created_at limit 17)`);
      await database.migrate();
      expect(await queued()).toEqual(['file-of-no-row']);
      // From then on in the insert; but not a deleted file's copy queued under the same id (a provider reusing ids).
      await reserve('file-named-after');
      await db.insert(providerFileDeletions).values({ providerFileId: 'file-deleted-and-reused' });
      await db.insert(files).values([file('file-named-after'), file('file-deleted-and-reused')]);
      expect(await queued()).toEqual(['file-deleted-and-reused', 'file-of-no-row']);
    } finally {
      await drop();
    }
  });
});

describe('0014: the idempotency keys of a project', () => {
  it('deletes the kept result of a question already gone and gives the others the project of theirs', async () => {
    const { database, drop } = await createTestDatabase();
    try {
      const { db } = database;
      const userId = uuidv7();
      await db.insert(users).values({ id: userId, email: `${userId}@example.com`, passwordHash: 'x', name: 'A' });
      const [project] = await db.insert(projects).values({ id: uuidv7(), userId, name: 'P' }).returning();
      const [question] = await insertMessages(db, project!.id, 1);
      // As the code before 0014 kept them: no project; a result names its question.
      const result = (questionId: string) => ({ userMessage: { id: questionId, projectId: project!.id, content: 'private' } });
      await db.insert(idempotencyKeys).values([
        { userId, key: 'kept', requestHash: 'h', state: 'done', response: result(question!.id) },
        { userId, key: 'cleared', requestHash: 'h', state: 'done', response: result(uuidv7()) },
        { userId, key: 'running', requestHash: 'h', state: 'running' },
      ]);
      // 0014 and those after it applied again, as to a database of before it.
      await db.execute(sql`delete from drizzle.__drizzle_migrations where id not in (select id from drizzle.__drizzle_migrations order by created_at limit 14)`);
      await database.migrate();
      const left = await db.select({ key: idempotencyKeys.key, projectId: idempotencyKeys.projectId }).from(idempotencyKeys).orderBy(idempotencyKeys.key);
      expect(left).toEqual([
        { key: 'kept', projectId: project!.id },
        { key: 'running', projectId: null },
      ]);
      // One that an instance of the code before 0014 finishes after it (a rolling deploy) has no project: the
      // clear, and the project's deletion, find it by the project its result names.
      const finishedByOldCode = (key: string) => db.insert(idempotencyKeys).values({ userId, key, requestHash: 'h', state: 'done', response: result(question!.id) });
      await finishedByOldCode('cleared later');
      await db.execute(sql`select clear_project_messages(${project!.id}, ${userId})`);
      expect(await db.select({ key: idempotencyKeys.key }).from(idempotencyKeys)).toEqual([{ key: 'running' }]);
      await finishedByOldCode('deleted later');
      // And from then on deleted with the project.
      await db.delete(projects).where(eq(projects.id, project!.id));
      expect(await db.select({ key: idempotencyKeys.key }).from(idempotencyKeys)).toEqual([{ key: 'running' }]);
    } finally {
      await drop();
    }
  });
});

describe.runIf(process.env.TEST_DATABASE_URL)('migrations during a PostgreSQL backup', () => {
  // 0011's ALTER TABLE waited for pg_dump's lock for as long as the backup ran, and every statement on
  // the projects of the instances still serving queued behind it.
  it('wait for a table a second at a time, so that the instances serving meanwhile are not held behind them', { timeout: 60_000 }, async () => {
    const { database, url, drop } = await createTestDatabase();
    const dump = new pg.Client({ connectionString: url });
    const reader = new pg.Client({ connectionString: url, statement_timeout: 3_000 });
    try {
      // 0011 and the migrations after it to apply again (they are written to run again).
      await database.db.execute(sql`delete from drizzle.__drizzle_migrations where id not in (select id from drizzle.__drizzle_migrations order by created_at limit 11)`);
      await Promise.all([dump.connect(), reader.connect()]);
      // What pg_dump holds on every table it reads, until it ends.
      await dump.query('begin isolation level repeatable read; lock table users, projects, files in access share mode');
      const waits: string[] = [];
      const migrating = database.migrate((waiting) => waits.push(waiting));
      await expect.poll(() => waits.length, { timeout: 20_000 }).toBeGreaterThan(0);
      expect(new Set(waits)).toEqual(new Set([MIGRATIONS_WAIT]));
      await reader.query('select count(*) from projects'); // within its 3 s, where it waited for the backup
      await dump.query('commit');
      await migrating;
      const applied = (await database.db.execute(sql`select count(*)::int as n from drizzle.__drizzle_migrations`)) as unknown as { rows: { n: number }[] };
      expect(applied.rows[0]!.n).toBe(readdirSync(migrationsFolder).filter((name) => name.endsWith('.sql')).length);
    } finally {
      await Promise.all([dump.end(), reader.end()]);
      await drop();
    }
  });
});

describe.runIf(process.env.TEST_DATABASE_URL)('migrations while another session applies them', () => {
  /** Runs `use` while another session holds the migrations' lock, as an instance applying them does. */
  async function whileAnotherApplies(use: (database: Database, other: pg.Client) => Promise<void>): Promise<void> {
    const { database, url, drop } = await createTestDatabase();
    const other = new pg.Client({ connectionString: url });
    try {
      await other.connect();
      await other.query('select pg_advisory_lock($1)', [MIGRATION_LOCK_ID]);
      await use(database, other);
    } finally {
      await other.end();
      await drop();
    }
  }

  it('wait for it a second at a time, saying so each time, then apply theirs', { timeout: 30_000 }, () =>
    whileAnotherApplies(async (database, other) => {
      const waits: string[] = [];
      const migrating = database.migrate((waiting) => waits.push(waiting));
      await expect.poll(() => waits.length, { timeout: 10_000 }).toBeGreaterThan(1);
      expect(new Set(waits)).toEqual(new Set([MIGRATIONS_WAIT_FOR_ANOTHER]));
      await other.query('select pg_advisory_unlock($1)', [MIGRATION_LOCK_ID]);
      await migrating;
    }));

  it('fail with one line, not a stack, when their connection is lost meanwhile', { timeout: 30_000 }, () =>
    whileAnotherApplies(async (database, other) => {
      let waits = 0;
      const migrating = database.migrate(() => waits++);
      const failed = expect(migrating).rejects.toThrow(MigrationError);
      await expect.poll(() => waits, { timeout: 10_000 }).toBeGreaterThan(0);
      await other.query(`select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() and query like '%pg_try_advisory_lock%' and pid <> pg_backend_pid()`);
      await failed;
      await expect(migrating).rejects.toThrow(/^Migrations could not be applied: \S/);
    }));
});

describe('a held connection', () => {
  it('runs what is sent on it in order, on one session, until it goes back', async () => {
    const { database, drop } = await createTestDatabase();
    try {
      const busy = () => (database.poolStats ? database.poolStats().total - database.poolStats().idle : 0);
      const probeOf = async (result: Promise<unknown>) => ((await result) as { rows: { probe: string | null }[] }).rows[0]!.probe;
      const held = await database.hold();
      // Both sent before either is answered: the second still runs after the first, in its session.
      const set = held.db.execute(sql`select set_config('chatbot.probe', 'held', false)`);
      const read = held.db.execute(sql`select current_setting('chatbot.probe', true) as probe`);
      await set;
      expect(await probeOf(read)).toBe('held');
      if (database.poolStats) {
        expect(busy()).toBe(1);
        // The pool's other connections do not have it meanwhile.
        expect(await probeOf(database.db.execute(sql`select current_setting('chatbot.probe', true) as probe`))).not.toBe('held');
      }
      held.release();
      expect(busy()).toBe(0);
      if (database.poolStats) {
        // Released with an error, a connection is closed rather than lent again.
        const broken = await database.hold();
        const total = database.poolStats().total;
        broken.release(new Error('broken'));
        expect(database.poolStats().total).toBe(total - 1);
      }
    } finally {
      await drop();
    }
  });
  it.skipIf(!process.env.TEST_DATABASE_URL)('outlives losing its connection while held (the database restarted): its statements fail, and given back it is closed', async () => {
    const { database, drop } = await createTestDatabase();
    try {
      const held = await database.hold();
      const { rows } = (await held.db.execute(sql`select pg_backend_pid() as pid`)) as unknown as { rows: { pid: number }[] };
      // Its connection ended from the database's side, as a restart ends it. Without a listener of its own,
      // the held client's 'error' event would be an uncaught exception here.
      await database.db.execute(sql`select pg_terminate_backend(${rows[0]!.pid})`);
      // Failed first with the database's own message, then, once the connection's end has been read, refused
      // by the client: the moment the lost connection is noticed, while it is still held.
      const attempt = () =>
        held.db.execute(sql`select 1`).then(
          () => 'answered',
          (error: Error) => (/not queryable/.test(String((error.cause as Error | undefined)?.message ?? error.message)) ? 'closed' : 'failed'),
        );
      await expect.poll(attempt).toBe('closed');
      const total = database.poolStats!().total;
      held.release();
      expect(database.poolStats!().total).toBe(total - 1);
      // The pool lends a working connection next.
      const next = await database.hold();
      expect(((await next.db.execute(sql`select 1 as one`)) as unknown as { rows: { one: number }[] }).rows[0]!.one).toBe(1);
      next.release();
    } finally {
      await drop();
    }
  });
});

describe.runIf(process.env.TEST_DATABASE_URL)("a PostgreSQL connection's statements (BoundedClient)", () => {
  it("answers a callback given in the statement's config once, leaves pg's own query objects unbounded, and sets no bound on a statement pg refuses at once", async () => {
    const { url, drop } = await createTestDatabase();
    // Bound at 100 ms + 1 s unanswered.
    const database = openPostgres(url!, { max: 1, queryTimeoutMs: 100 });
    const held = await database.hold();
    const client = (held.db as unknown as { $client: pg.ClientBase }).$client;
    try {
      const answers: unknown[] = [];
      const returned = client.query({ text: 'select 1 as one', callback: (error: Error | undefined, result: pg.QueryResult) => answers.push(error ?? result.rows) } as pg.QueryConfig);
      expect(returned).toBeUndefined();
      await expect.poll(() => answers).toEqual([[{ one: 1 }]]);
      const refused: unknown[] = [];
      expect(() => client.query(null as unknown as string, (error: Error | undefined) => refused.push(error))).toThrow(/null or undefined query/);
      // A query object of pg's own, with its callback: answered as it was made to, and left unbounded.
      const made: unknown[] = [];
      client.query(new pg.Query('select 4 as four', [], (error: Error | undefined, result: pg.QueryResult) => made.push(error ?? result.rows)));
      await expect.poll(() => made).toEqual([[{ four: 4 }]]);
      // Past the bound: no answer comes to the refused statement, nor a second to the query object, and
      // the connection was not closed.
      await sleep(1_300);
      expect(refused).toEqual([]);
      expect(made).toEqual([[{ four: 4 }]]);
      expect((await client.query('select 2 as two')).rows).toEqual([{ two: 2 }]);
      // A promise's failure leads back to its caller, as pg's own did.
      const failed = await client.query('select 1 / 0').catch((error: Error) => error);
      expect(failed).toMatchObject({ message: 'division by zero' });
      expect((failed as Error).stack).toContain('database.test.ts');
    } finally {
      held.release();
      await database.close();
      await drop();
    }
  });
});

describe('a transaction', () => {
  it('rejects, on either database, when a statement failed in it though its work went on: nothing is committed', async () => {
    const { database, drop } = await createTestDatabase();
    try {
      const email = `${randomBytes(8).toString('hex')}@example.com`;
      const outcome = await database
        .transaction(async (tx) => {
          await tx.insert(users).values({ id: uuidv7(), email, passwordHash: 'x', name: 'kept?' });
          // A statement that fails, its error caught: the transaction is aborted all the same.
          await tx.execute(sql`select 1 / 0`).catch(() => undefined);
          return 'work done';
        })
        .then(
          (value) => `resolved: ${value}`,
          (error: Error) => `rejected: ${error.message}`,
        );
      expect(outcome).toMatch(/^rejected: .*rolled back/);
      expect(await database.db.select().from(users).where(sql`${users.email} = ${email}`)).toEqual([]);
    } finally {
      await drop();
    }
  });
});

describe('npm run db:migrate', () => {
  it('says in one line that the embedded database is in use by another process', { timeout: 60_000 }, async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'chatbot-migrate-'));
    // This test's own process certainly runs: the lock names it as the holder.
    writeFileSync(join(dataDir, 'pglite.lock'), String(process.pid));
    const migrate = spawnSync(process.execPath, ['--import', 'tsx', 'src/db/migrate-cli.ts'], {
      env: { PATH: process.env.PATH, HOME: process.env.HOME, DATA_DIR: dataDir },
      encoding: 'utf8',
    });
    expect(migrate.status).toBe(1);
    expect(migrate.stderr.trim()).toMatch(/^The embedded database is in use by process \d+[^\n]*$/);
  });

  // Each stopped the start with PGlite's own error and a stack trace, 15 lines of it.
  it.each([
    ['cut short (a damaged folder, or one of another PGlite version)', (dir: string) => (mkdirSync(dir), writeFileSync(join(dir, 'PG_VERSION'), '17\n'))],
    ['a file where its folder should be', (dir: string) => writeFileSync(dir, '')],
  ])('says in one line that the embedded database cannot be opened: %s', { timeout: 60_000 }, (_, spoil) => {
    const dataDir = mkdtempSync(join(tmpdir(), 'chatbot-migrate-'));
    spoil(join(dataDir, 'pglite'));
    const migrate = spawnSync(process.execPath, ['--import', 'tsx', 'src/db/migrate-cli.ts'], {
      env: { PATH: process.env.PATH, HOME: process.env.HOME, DATA_DIR: dataDir },
      encoding: 'utf8',
    });
    expect(migrate.status).toBe(1);
    expect(migrate.stderr.trim()).toMatch(new RegExp(`^Cannot open the embedded database in ${join(dataDir, 'pglite')}: [^\n]+$`));
  });
});

describe.runIf(process.env.TEST_DATABASE_URL)('npm run db:migrate', () => {
  // A database of LATIN1 took the service's start, and then refused every name, prompt or message in
  // Japanese, Arabic or emoji, told the text held a NUL.
  it.runIf(process.env.TEST_DATABASE_URL)('says in one line that a database of an encoding that cannot hold any text will not do', { timeout: 60_000 }, async () => {
    const admin = process.env.TEST_DATABASE_URL!;
    const name = `chatbot_latin1_${randomBytes(6).toString('hex')}`;
    await adminQuery(admin, `create database ${name} encoding 'LATIN1' template template0 lc_collate 'C' lc_ctype 'C'`);
    try {
      const url = new URL(admin);
      url.pathname = `/${name}`;
      const migrate = spawnSync(process.execPath, ['--import', 'tsx', 'src/db/migrate-cli.ts'], {
        env: { PATH: process.env.PATH, HOME: process.env.HOME, DATABASE_URL: url.toString(), DATA_DIR: mkdtempSync(join(tmpdir(), 'chatbot-migrate-')) },
        encoding: 'utf8',
      });
      expect(migrate.status).toBe(1);
      expect(migrate.stderr.trim()).toBe(
        "The database of DATABASE_URL is encoded in LATIN1, which cannot hold most languages' text: use one created with UTF8 (createdb --encoding=UTF8 --template=template0 <name>)",
      );
      // Refused before any migration: nothing made in it.
      const client = new pg.Client({ connectionString: url.toString() });
      await client.connect();
      const { rows } = await client.query(`select count(*)::int as tables from pg_tables where schemaname in ('public', 'drizzle')`).finally(() => client.end());
      expect(rows).toEqual([{ tables: 0 }]);
    } finally {
      await adminQuery(admin, `drop database if exists ${name} with (force)`);
    }
  });

  it('says in one line why the migrations could not be applied: a user that may not create in the database', { timeout: 60_000 }, async () => {
    const admin = process.env.TEST_DATABASE_URL!;
    const suffix = randomBytes(6).toString('hex');
    const [role, name] = [`chatbot_nocreate_${suffix}`, `chatbot_test_${suffix}`];
    await adminQuery(admin, `create role ${role} login password 'migrate-test-pw'`);
    await adminQuery(admin, `create database ${name}`);
    try {
      const url = new URL(admin);
      Object.assign(url, { username: role, password: 'migrate-test-pw', pathname: `/${name}` });
      const migrate = spawnSync(process.execPath, ['--import', 'tsx', 'src/db/migrate-cli.ts'], {
        env: { PATH: process.env.PATH, HOME: process.env.HOME, DATABASE_URL: url.toString(), DATA_DIR: mkdtempSync(join(tmpdir(), 'chatbot-migrate-')) },
        encoding: 'utf8',
      });
      expect(migrate.status).toBe(1);
      expect(migrate.stderr.trim()).toMatch(/^[^\n]*permission denied for database [^\n]+$/);
      expect(migrate.stderr).not.toContain('migrate-test-pw');
    } finally {
      await adminQuery(admin, `drop database if exists ${name} with (force)`);
      await adminQuery(admin, `drop role if exists ${role}`);
    }
  });
});
