import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { rename, rm, writeFile } from 'node:fs/promises';
import { type AddressInfo, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { dirname, join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { sql } from 'drizzle-orm';
import type { PgTable } from 'drizzle-orm/pg-core';
import pg from 'pg';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { copyUploads } from '../../src/db/backup-files.js';
import { findPostgresTool, libpqConnection } from '../../src/db/backup-postgres.js';
import { stageFolder } from '../../src/db/backup-store.js';
import { type Db, openPglite, openPostgres, pgliteFolder } from '../../src/db/database.js';
import { deletedProjects, files, idempotencyKeys, messages, projects, prompts, providerFileDeletions, schema, users } from '../../src/db/schema.js';
import type { FileDto } from '../../src/modules/files/schemas.js';
import { createProject, expectProblem, registerUser, startTestApp, testConfig } from '../support/app.js';
import { createTestDatabase } from '../support/database.js';
import { canMountTmpfs, canUsePidNamespaces, freePort, mountingTmpfs, spawnServer, waitUntilServing } from '../support/server-process.js';
import { multipart } from '../support/multipart.js';

const scratch: string[] = [];
function scratchFolder(): string {
  const folder = mkdtempSync(join(tmpdir(), 'chatbot-backup-'));
  scratch.push(folder);
  return folder;
}
afterAll(() => scratch.forEach((folder) => rmSync(folder, { recursive: true, force: true })));

/** Runs the command an operator runs, in its own process, with a clean environment plus `env`. */
async function runBackupCli(
  args: string[],
  env: Record<string, string>,
  { ownPidNamespace = false, filesOnAVolume = false, killOn = '' } = {},
): Promise<{ code: number | null; output: string }> {
  // Killed where a crash could cut it short: see test/support/kill-on.mjs.
  const preload = killOn ? ['--import', './test/support/kill-on.mjs'] : [];
  const command = [process.execPath, ...preload, '--import', 'tsx', 'src/db/backup-cli.ts', ...args];
  // A volume of its own mounted at DATA_DIR/files (a tmpfs, in a mount namespace of the command's own).
  const onVolume = filesOnAVolume ? mountingTmpfs({ path: join(env.DATA_DIR!, 'files'), bytes: 16 * 1024 * 1024 }) : [];
  const [file, ...rest] = [...(ownPidNamespace ? ['unshare', '--pid', '--fork'] : []), ...onVolume, ...command];
  const child = spawn(file!, rest, {
    // No JWT_SECRET: the commands need none, and make none in DATA_DIR.
    env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env, ...(killOn ? { KILL_ON: killOn } : {}) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (chunk) => (output += chunk));
  child.stderr.on('data', (chunk) => (output += chunk));
  const [code] = (await once(child, 'close')) as [number | null];
  return { code, output };
}

/** The database the commands work on: a throwaway PostgreSQL database with TEST_DATABASE_URL, else DATA_DIR/pglite. */
interface Target {
  env: Record<string, string>;
  /** Runs `use` on the database; the embedded one is closed again after it, as the commands need it stopped. */
  withDb<T>(use: (db: Db) => Promise<T>): Promise<T>;
  /** Loses everything: the tables and the migration history. */
  wipe(): Promise<void>;
  drop(): Promise<void>;
}

async function createTarget(dataDir: string): Promise<Target> {
  if (process.env.TEST_DATABASE_URL) {
    const testDb = await createTestDatabase();
    return {
      env: { DATABASE_URL: testDb.url! },
      withDb: (use) => use(testDb.database.db),
      wipe: async () => {
        await testDb.database.db.execute(sql`drop schema drizzle cascade; drop schema public cascade; create schema public`);
      },
      drop: () => testDb.drop(),
    };
  }
  const folder = pgliteFolder(dataDir);
  const withDb = async <T>(use: (db: Db) => Promise<T>): Promise<T> => {
    const database = await openPglite(folder);
    try {
      return await use(database.db);
    } finally {
      await database.close();
    }
  };
  const database = await openPglite(folder);
  await database.migrate();
  await database.close();
  return { env: {}, withDb, wipe: async () => rmSync(folder, { recursive: true, force: true }), drop: async () => {} };
}

/** Runs `use` with a target in a DATA_DIR of its own, dropped after it. */
async function withTarget(use: (target: Target, dataDir: string) => Promise<void>): Promise<void> {
  const dataDir = scratchFolder();
  const target = await createTarget(dataDir);
  try {
    await use(target, dataDir);
  } finally {
    await target.drop();
  }
}

/** The emails of the target's users. */
const emailsIn = (target: Target) => target.withDb(async (db) => (await db.select().from(users)).map((user) => user.email));

/** A restore refused with `message` that changed nothing: the user added after the backup is there, and no folder beside the files. */
async function expectNothingRestored(refused: { code: number | null; output: string }, message: RegExp, target: Target, dataDir: string): Promise<void> {
  expect(refused.code).toBe(1);
  expect(refused.output.trim()).toMatch(message);
  expect(await emailsIn(target)).toEqual(['later@example.com']);
  expect(readdirSync(dataDir).filter((name) => name.startsWith('files'))).toEqual(['files']);
}

/**
 * Uploads in DATA_DIR and a backup of them and of the database, then a user and a file added after it:
 * what a restore takes away.
 */
async function backUpThenChange(dataDir: string, target: Target): Promise<{ env: Record<string, string>; backup: string; filesDir: string }> {
  const filesDir = join(dataDir, 'files');
  writeUploads(filesDir);
  const env = { DATA_DIR: dataDir, ...target.env };
  const backup = join(scratchFolder(), 'backup');
  const made = await runBackupCli(['backup', backup], env);
  expect(made.code, made.output).toBe(0);
  await target.withDb((db) => db.insert(users).values({ id: uuidv7(), email: 'later@example.com', passwordHash: 'x', name: 'Later' }));
  writeFileSync(join(filesDir, 'later.bin'), 'uploaded after the backup');
  return { env, backup, filesDir };
}

/** The file row `seed` writes: its bytes are among `uploads`, where the files module keeps them. */
const SEEDED_FILE = { projectId: uuidv7(), id: uuidv7(), size: 70_000 };
const seededFilePath = `${SEEDED_FILE.projectId}/${SEEDED_FILE.id}`;

/** Rows in every table, with the values that tend to break a round trip: nulls, JSON, Unicode, exact times. */
async function seed(db: Db): Promise<void> {
  const at = (ms: number) => new Date(Date.UTC(2025, 0, 2, 3, 4, 5, ms));
  const [ann, bob] = [uuidv7(), uuidv7()];
  await db.insert(users).values([
    { id: ann, email: 'Ann@Example.com', passwordHash: '$2b$04$abcdefghijklmnopqrstuu', name: 'Ann', tokenVersion: 3, createdAt: at(1), updatedAt: at(2) },
    { id: bob, email: 'bob@example.com', passwordHash: '$2b$04$zyxwvutsrqponmlkjihgfe', name: 'Bøb 🤖', createdAt: at(3), updatedAt: at(3) },
  ]);
  const [first, second] = [SEEDED_FILE.projectId, uuidv7()];
  await db.insert(projects).values([
    { id: first, userId: ann, name: 'Support bot', description: 'answers "quoted"\nquestions', provider: 'openrouter', model: 'gpt-4o-mini' },
    { id: second, userId: bob, name: 'Empty', description: null, provider: null, model: null },
  ]);
  await db.insert(prompts).values({ id: uuidv7(), projectId: first, title: 'Tone', content: 'Be brief.\tNo emoji. ünïcödé' });
  await db.insert(deletedProjects).values({ id: uuidv7(), deletedAt: at(7) });
  await db.insert(messages).values([
    { id: uuidv7(), projectId: first, role: 'system', content: 'You help.', status: 'complete' },
    { id: uuidv7(), projectId: first, role: 'user', content: 'héllo 👋', status: 'complete', createdAt: at(10) },
    {
      id: uuidv7(),
      projectId: first,
      role: 'assistant',
      content: 'Hi!',
      status: 'incomplete',
      model: 'gpt-4o-mini',
      promptTokens: 12,
      completionTokens: 3,
      totalTokens: 15,
      createdAt: at(11),
    },
  ]);
  await db.insert(files).values({
    ...SEEDED_FILE,
    filename: 'report (final).pdf',
    mimeType: 'application/pdf',
    sha256: 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
    storageUrl: 'file:///nested/deeper/b.bin',
    providerFileId: null,
  });
  // A deleted file's provider copy still to be deleted upstream: the restored database tries it again.
  await db.insert(providerFileDeletions).values({ providerFileId: 'file-abc123', attempts: 2, dueAt: at(20), createdAt: at(12) });
  await db.insert(idempotencyKeys).values([
    { userId: ann, key: 'key-1', requestHash: 'h1', state: 'done', response: { status: 200, body: { id: 'x', nested: [1, 'two', null] } } },
    { userId: ann, key: 'key-2', requestHash: 'h2', state: 'running', response: null },
  ]);
}

/** Every row of every table in the schema, in a stable order. */
async function snapshot(db: Db): Promise<Record<string, unknown[]>> {
  const tables: Record<string, unknown[]> = {};
  for (const [name, table] of Object.entries(schema)) {
    const rows = await db.select().from(table as PgTable);
    tables[name] = rows.sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
  }
  return tables;
}

const uploads: Record<string, Buffer> = {
  'a.bin': randomBytes(70_000),
  [seededFilePath]: randomBytes(SEEDED_FILE.size),
  'nested/deeper/b.bin': randomBytes(1_234),
  'empty.bin': Buffer.alloc(0),
  'ünïcode name (1).txt': Buffer.from('bytes\u0000with a NUL\n'),
};

function writeUploads(folder: string): void {
  for (const [name, bytes] of Object.entries(uploads)) {
    mkdirSync(dirname(join(folder, name)), { recursive: true });
    writeFileSync(join(folder, name), bytes);
  }
}

function readUploads(folder: string): Record<string, Buffer> {
  const found: Record<string, Buffer> = {};
  for (const name of readdirSync(folder, { recursive: true, encoding: 'utf8' })) {
    if (statSync(join(folder, name)).isFile()) found[name] = readFileSync(join(folder, name));
  }
  return found;
}

describe(`backup and restore (${process.env.TEST_DATABASE_URL ? 'PostgreSQL' : 'embedded PGlite'})`, () => {
  it('backs up, restores over later changes and onto nothing, and finds every row and file again', { timeout: 120_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      const filesDir = join(dataDir, 'files');
      const rows = await target.withDb(async (db) => {
        await seed(db);
        return snapshot(db);
      });
      for (const [table, tableRows] of Object.entries(rows)) expect(tableRows.length, `${table} has rows`).toBeGreaterThan(0);
      writeUploads(filesDir);
      const env = { DATA_DIR: dataDir, ...target.env };
      const backup = join(scratchFolder(), 'backup');

      const made = await runBackupCli(['backup', backup], env);
      expect(made.code, made.output).toBe(0);
      expect(JSON.parse(readFileSync(join(backup, 'manifest.json'), 'utf8'))).toMatchObject({
        format: 'chatbot-platform-backup',
        version: 1,
        kind: process.env.TEST_DATABASE_URL ? 'postgres' : 'pglite',
      });
      // Password hashes, every conversation: no other local user may read it.
      expect(statSync(backup).mode & 0o777).toBe(0o700);

      const restoreAndFindEverything = async () => {
        const restored = await runBackupCli(['restore', backup], env);
        expect(restored.code, restored.output).toBe(0);
        const folders = [filesDir, ...(process.env.TEST_DATABASE_URL ? [] : [pgliteFolder(dataDir)])];
        for (const folder of folders) expect(statSync(folder).mode & 0o777, `${folder} is its owner's alone`).toBe(0o700);
        expect(await target.withDb(snapshot)).toEqual(rows);
        expect(readUploads(filesDir)).toEqual(uploads);
      };

      // What changed after the backup is undone, not merged with it.
      await target.withDb(async (db) => {
        await db.insert(users).values({ id: uuidv7(), email: 'later@example.com', passwordHash: 'x', name: 'Later' });
        await db.delete(messages);
      });
      writeFileSync(join(filesDir, 'a.bin'), 'changed');
      writeFileSync(join(filesDir, 'later.bin'), 'uploaded after the backup');
      await restoreAndFindEverything();

      // Everything lost, DATA_DIR too.
      await target.wipe();
      rmSync(dataDir, { recursive: true, force: true });
      await restoreAndFindEverything();

      const again = await runBackupCli(['backup', backup], env);
      expect(again.code).toBe(1);
      expect(again.output.trim()).toMatch(/^\S+ already exists: name a new folder for the backup$/);
    });
  });
  it('copies the files before it touches the database: a file it cannot copy changes nothing', { timeout: 60_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      const { env, backup, filesDir } = await backUpThenChange(dataDir, target);
      execFileSync('mkfifo', [join(backup, 'files', 'pipe')]); // no copy of a FIFO can be made

      const refused = await runBackupCli(['restore', backup], env);
      await expectNothingRestored(refused, /^Nothing was restored: the backup's files could not be copied: [^\n]+$/, target, dataDir);
      expect(readUploads(filesDir)).toEqual({ ...uploads, 'later.bin': Buffer.from('uploaded after the backup') });
    });
  });
  // It replaced the database, then could not rename the mount point (EBUSY): the backup's rows beside the live files.
  it.runIf(canMountTmpfs)('refuses, changing nothing, to restore files that are a volume of their own', { timeout: 60_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      const { env, backup } = await backUpThenChange(dataDir, target);
      const refused = await runBackupCli(['restore', backup], env, { filesOnAVolume: true });
      const message = /^Nothing was restored: \S+\/files cannot be replaced as a whole \([^\n]*\): it is a mount point; mount the volume at the folder above it instead$/;
      await expectNothingRestored(refused, message, target, dataDir);
    });
  });
  // The embedded database's restore was cut while it removed the database it had set aside (long, for a
  // large one), once in place, and the files not yet: the next start served the backup's rows with the
  // files of before. On PostgreSQL, cut as the files were set aside (the first rename of them is a probe),
  // its restore committed.
  it('is finished by the next start when cut short past its point of no return', { timeout: 60_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      await target.withDb((db) => db.insert(users).values({ id: uuidv7(), email: 'in-backup@example.com', passwordHash: 'x', name: 'Kept' }));
      const { env, backup, filesDir } = await backUpThenChange(dataDir, target);
      const cut = await runBackupCli(['restore', backup], env, { killOn: target.env.DATABASE_URL ? `rename:${filesDir}:2` : 'rm:pglite.replaced' });
      expect(cut.code, cut.output).toBeNull(); // killed
      const app = await buildApp(testConfig(env));
      await app.close();
      expect(await emailsIn(target)).toEqual(['in-backup@example.com']);
      expect(readUploads(filesDir)).toEqual(uploads);
      expect(readdirSync(dataDir).filter((name) => !['files', 'pglite', 'pglite.lock'].includes(name))).toEqual([]);
    });
  });
  it('backs up, after a restore cut short past its point of no return, what the next start would serve', { timeout: 120_000 }, async () => {
    // Cut between the database and the files (and, embedded, between the two renames of the database's swap).
    const cuts = process.env.TEST_DATABASE_URL ? [(filesDir: string) => `rename:${filesDir}:2`] : [() => 'rm:pglite.replaced', () => 'rename:pglite.restoring:1'];
    for (const killOn of cuts) {
      await withTarget(async (target, dataDir) => {
        await target.withDb((db) => db.insert(users).values({ id: uuidv7(), email: 'in-backup@example.com', passwordHash: 'x', name: 'Kept' }));
        const { env, backup, filesDir } = await backUpThenChange(dataDir, target);
        const cut = await runBackupCli(['restore', backup], env, { killOn: killOn(filesDir) });
        expect(cut.code, cut.output).toBeNull(); // killed
        const again = join(scratchFolder(), 'again');
        const made = await runBackupCli(['backup', again], env);
        expect(made.code, made.output).toBe(0);
        expect(readUploads(join(again, 'files'))).toEqual(uploads);
        expect(await emailsIn(target)).toEqual(['in-backup@example.com']);
        expect(readUploads(filesDir)).toEqual(uploads);
      });
    }
  });

  it('refuses a backup that would hold no file of the rows it holds: DATA_DIR is not where the files are', { timeout: 120_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      await target.withDb(seed);
      const backup = join(scratchFolder(), 'backup');
      const refused = await runBackupCli(['backup', backup], { DATA_DIR: dataDir, ...target.env });
      expect(refused.code).toBe(1);
      expect(refused.output.trim()).toBe(`${join(dataDir, 'files')} does not exist, though the database names uploaded files: check DATA_DIR`);
      expect(existsSync(backup)).toBe(false);
      expect(existsSync(`${backup}.partial`)).toBe(false);
      // Without file rows there is nothing to miss.
      await target.withDb((db) => db.delete(files));
      const made = await runBackupCli(['backup', backup], { DATA_DIR: dataDir, ...target.env });
      expect(made.code, made.output).toBe(0);
    });
  });

  // A cron job run without DATA_DIR, where another install's (or an empty) files folder stood: the
  // backup held no upload, said it succeeded, and its restore deleted every one.
  it('refuses a backup from a files folder that holds none of the files the database names, and names those it lacks', { timeout: 120_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      await target.withDb(seed);
      const filesDir = join(dataDir, 'files');
      mkdirSync(filesDir, { recursive: true });
      const env = { DATA_DIR: dataDir, ...target.env };
      const backup = join(scratchFolder(), 'backup');
      const refused = await runBackupCli(['backup', backup], env);
      expect(refused.code).toBe(1);
      expect(refused.output.trim()).toBe(`${filesDir} holds none of the 1 uploaded files the database names: check DATA_DIR`);
      expect(existsSync(backup)).toBe(false);
      expect(existsSync(`${backup}.partial`)).toBe(false);

      // Bytes lost before the backup: it is made, says so, and its manifest names them.
      writeUploads(filesDir);
      const lost = { ...SEEDED_FILE, id: uuidv7() };
      await target.withDb((db) =>
        db.insert(files).values({ ...lost, filename: 'lost.txt', mimeType: 'text/plain', sha256: '0'.repeat(64), storageUrl: 'file:///lost' }),
      );
      const made = await runBackupCli(['backup', backup], env);
      expect(made.code, made.output).toBe(0);
      const lostPath = `${lost.projectId}/${lost.id}`;
      expect(made.output).toContain(`warning: 1 of the uploaded files the database names were not under DATA_DIR/files, and are not in the backup (${lostPath}…)`);
      expect(JSON.parse(readFileSync(join(backup, 'manifest.json'), 'utf8'))).toMatchObject({
        files: [{ key: seededFilePath, size: SEEDED_FILE.size }],
        missingFiles: [lostPath],
      });
    });
  });

  it('restores nothing from a backup whose uploaded files are missing or cut short', { timeout: 120_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      await target.withDb(seed);
      const { env, backup, filesDir } = await backUpThenChange(dataDir, target);
      const copy = join(backup, 'files', seededFilePath);
      const whole = readFileSync(copy);
      const damaged = /^Nothing was restored: \S+ is damaged: 1 of its uploaded files are missing or cut short \(\S+…\)$/;
      for (const damage of [() => writeFileSync(copy, whole.subarray(0, 100)), () => rmSync(copy)]) {
        damage();
        const refused = await runBackupCli(['restore', backup], env);
        expect(refused.code).toBe(1);
        expect(refused.output.trim()).toMatch(damaged);
        expect(await emailsIn(target)).toContain('later@example.com');
        expect(readUploads(filesDir)['later.bin']).toEqual(Buffer.from('uploaded after the backup'));
      }
    });
  });

  // A cron job's backup and one by hand into the same dated folder: one of them named the folder
  // complete without its database.
  it('refuses a backup into a folder another backup is writing, and leaves that one be', { timeout: 60_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      const backup = join(scratchFolder(), 'backup');
      mkdirSync(`${backup}.partial`);
      writeFileSync(join(`${backup}.partial`, 'database.dump'), 'being written');
      const refused = await runBackupCli(['backup', backup], { DATA_DIR: dataDir, ...target.env });
      expect(refused.code).toBe(1);
      expect(refused.output.trim()).toBe(`${backup}.partial exists: another backup is writing ${backup}, or one was cut short (then remove ${backup}.partial)`);
      expect(readFileSync(join(`${backup}.partial`, 'database.dump'), 'utf8')).toBe('being written');
      expect(existsSync(backup)).toBe(false);
    });
  });

  it('refuses a backup folder inside the folders a restore replaces, however it is named, and restores from none', { timeout: 180_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      const { env, backup, filesDir } = await backUpThenChange(dataDir, target);
      const link = join(scratchFolder(), 'link');
      execFileSync('ln', ['-s', dataDir, link]);
      for (const inside of [join(filesDir, 'backup'), join(link, 'files', 'nested', 'backup'), join(pgliteFolder(dataDir), 'backup'), join(`${filesDir}.restoring`, 'x')]) {
        const refused = await runBackupCli(['backup', inside], env);
        expect(refused.code, inside).toBe(1);
        expect(refused.output.trim()).toMatch(/ is inside \S+, which a restore replaces: keep backups outside it \(in DATA_DIR\/backups, or on another volume\)$/);
      }
      expect(readUploads(filesDir)).toEqual({ ...uploads, 'later.bin': Buffer.from('uploaded after the backup') });
      // A backup copied into the files would be deleted by its own restore.
      const copied = join(filesDir, 'kept-backup');
      execFileSync('cp', ['-r', backup, copied]);
      const refused = await runBackupCli(['restore', copied], env);
      await expectNothingRestored(refused, /^\S+ is inside \S+, which a restore replaces/, target, dataDir);
      expect(existsSync(copied)).toBe(true);
      // Beside them, under DATA_DIR, is where a container keeps its backups.
      const made = await runBackupCli(['backup', join(dataDir, 'backups', 'nightly')], env);
      expect(made.code, made.output).toBe(0);
    });
  });

  it('leaves out uploads in progress, which come and go in files/tmp while it copies', { timeout: 60_000 }, async () => {
    await withTarget(async (target, dataDir) => {
      writeUploads(join(dataDir, 'files'));
      const staging = join(dataDir, 'files', 'tmp');
      const backup = join(scratchFolder(), 'backup');
      const made = await whileChurning(staging, () => runBackupCli(['backup', backup], { DATA_DIR: dataDir, ...target.env }));
      expect(made.code, made.output).toBe(0);
      expect(readUploads(join(backup, 'files'))).toEqual(uploads);
      expect(existsSync(join(backup, 'files', 'tmp'))).toBe(false);
    });
  });
});

describe.runIf(process.env.TEST_DATABASE_URL)('a PostgreSQL backup while the service runs', () => {
  it('holds deletes of files until the files are copied: every file row of the backup has its bytes', { timeout: 120_000 }, async () => {
    const t = await startTestApp();
    const url = t.testDb.url!;
    const holder = new pg.Client({ connectionString: url });
    // Not the holder: a transaction sees pg_stat_activity as it was when it first read it.
    const watcher = new pg.Client({ connectionString: url });
    try {
      const user = await registerUser(t.app);
      const project = await createProject(t.app, user);
      const filesUrl = `/api/v1/projects/${project.id}/files`;
      const contents = ['kept', 'deleted during the backup'];
      const uploaded: FileDto[] = [];
      for (const content of contents) {
        const form = multipart({ filename: 'a.txt', type: 'text/plain', content });
        const response = await t.app.inject({ method: 'POST', url: filesUrl, headers: { ...user.auth, ...form.headers }, payload: form.payload });
        expect(response.statusCode, response.body).toBe(201);
        uploaded.push(response.json());
      }

      // pg_dump is held right after it took its snapshot, before the files are copied.
      await Promise.all([holder.connect(), watcher.connect()]);
      await holder.query('begin; lock table prompts in access exclusive mode');
      const env = { DATABASE_URL: url, DATA_DIR: t.config.DATA_DIR };
      const backup = join(scratchFolder(), 'backup');
      const backingUp = runBackupCli(['backup', backup], env);
      await waitUntil(() => waitingOnLock(watcher, `application_name = 'pg_dump'`));
      let deleted = false;
      const deleting = t.app.inject({ method: 'DELETE', url: `${filesUrl}/${uploaded[1]!.id}`, headers: user.auth }).finally(() => (deleted = true));
      await waitUntil(async () => deleted || (await waitingOnLock(watcher, `query ilike 'delete from "files"%'`)));
      expect(deleted, 'the delete waits for the backup').toBe(false);
      await holder.query('commit');
      const made = await backingUp;
      expect(made.code, made.output).toBe(0);
      expect((await deleting).statusCode).toBe(204);

      const restored = await runBackupCli(['restore', backup], env);
      expect(restored.code, restored.output).toBe(0);
      const listed = (await t.app.inject({ method: 'GET', url: filesUrl, headers: user.auth })).json() as { data: FileDto[] };
      expect(listed.data.map((file) => file.id)).toEqual(uploaded.map((file) => file.id));
      for (const [i, file] of uploaded.entries()) {
        const content = await t.app.inject({ method: 'GET', url: `${filesUrl}/${file.id}/content`, headers: user.auth });
        expect(content.statusCode, file.id).toBe(200);
        expect(content.body).toBe(contents[i]);
      }
    } finally {
      await Promise.all([holder.end(), watcher.end()]);
      await t.close();
    }
  });

  it("holds a project's delete before it locks anything: writes to the project go on meanwhile", { timeout: 60_000 }, async () => {
    const t = await startTestApp();
    const holder = new pg.Client({ connectionString: t.testDb.url! });
    const watcher = new pg.Client({ connectionString: t.testDb.url! });
    try {
      const user = await registerUser(t.app);
      const project = await createProject(t.app, user);
      await Promise.all([holder.connect(), watcher.connect()]);
      // What a backup holds from its snapshot until its files are copied.
      await holder.query('begin; lock table files in share mode');
      const deleting = t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${project.id}`, headers: user.auth });
      await waitUntil(() => waitingOnLock(watcher, 'datname = current_database()'));

      const renamed = t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${project.id}`, headers: user.auth, payload: { name: 'renamed' } });
      const answered = await Promise.race([renamed.then((response) => response.statusCode), sleep(5_000).then(() => 'held')]);
      expect(answered).toBe(200);

      await holder.query('commit');
      expect((await deleting).statusCode).toBe(204);
    } finally {
      await Promise.all([holder.end(), watcher.end()]);
      await t.close();
    }
  });

  // The driver gave up on the statement at the bound, but PostgreSQL went on waiting, and stored the file
  // (deleted it) once the backup let go: a 503 for an upload that was kept, a delete's bytes left behind.
  it('stores nothing of an upload or delete that waited past DATABASE_QUERY_TIMEOUT_MS and was answered 503', { timeout: 60_000 }, async () => {
    const t = await startTestApp();
    const database = openPostgres(t.testDb.url!, { queryTimeoutMs: 500 });
    const app = await buildApp(t.config, { database });
    const holder = new pg.Client({ connectionString: t.testDb.url! });
    try {
      const user = await registerUser(app);
      const project = await createProject(app, user);
      const filesUrl = `/api/v1/projects/${project.id}/files`;
      const upload = () => {
        const form = multipart({ filename: 'a.txt', type: 'text/plain', content: 'held' });
        return app.inject({ method: 'POST', url: filesUrl, headers: { ...user.auth, ...form.headers }, payload: form.payload });
      };
      const kept = (await upload()).json() as FileDto;
      await holder.connect();
      // What a backup holds from its snapshot until its files are copied.
      await holder.query('begin; lock table files in share mode');
      expectProblem(await upload(), 503, 'SERVICE_UNAVAILABLE');
      expectProblem(await app.inject({ method: 'DELETE', url: `${filesUrl}/${kept.id}`, headers: user.auth }), 503, 'SERVICE_UNAVAILABLE');
      await holder.query('commit');
      // Nothing was waiting any more to store anything: a statement still waiting would have run at the commit.
      const listed = (await app.inject({ method: 'GET', url: filesUrl, headers: user.auth })).json() as { data: FileDto[] };
      expect(listed.data.map((file) => file.id)).toEqual([kept.id]);
      expect((await app.inject({ method: 'GET', url: `${filesUrl}/${kept.id}/content`, headers: user.auth })).body).toBe('held');
      // The refused upload's bytes too: its insert, cancelled, was rolled back, and nothing names them.
      expect(readdirSync(join(t.config.DATA_DIR, 'files', project.id))).toEqual([kept.id]);
    } finally {
      await holder.end();
      await app.close();
      await database.close();
      await t.close();
    }
  });
});

/** Whether a session matching `where` waits on a lock. */
async function waitingOnLock(client: pg.Client, where: string): Promise<boolean> {
  const { rowCount } = await client.query(`select 1 from pg_stat_activity where wait_event_type = 'Lock' and ${where}`);
  return rowCount! > 0;
}

async function waitUntil(condition: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`not so within ${timeoutMs} ms: ${String(condition)}`);
    await sleep(50);
  }
}

describe('copying the uploaded files', () => {
  it('skips files removed while it copies, and copies the others byte for byte', async () => {
    const from = join(scratchFolder(), 'files');
    writeUploads(from);
    const to = join(scratchFolder(), 'copy');
    await whileChurning(join(from, 'project'), () => copyUploads(from, to));
    const copied = readUploads(to);
    for (const [name, bytes] of Object.entries(copied)) {
      if (name.startsWith('project/')) expect(bytes.toString(), name).toBe(name.slice('project/'.length));
    }
    expect(Object.fromEntries(Object.entries(copied).filter(([name]) => !name.startsWith('project/')))).toEqual(uploads);
  });
});

/**
 * Runs `work` while files keep vanishing from `folder` and appearing in it whole (renamed in, as the
 * storage does): 3000 of them at first, then one removed and one added at a time until `work` ends.
 */
async function whileChurning<T>(folder: string, work: () => Promise<T>): Promise<T> {
  const COUNT = 3000;
  const incoming = scratchFolder(); // on the same file system, outside what is copied
  mkdirSync(folder, { recursive: true });
  for (let i = 0; i < COUNT; i++) writeFileSync(join(folder, String(i)), String(i));
  let done = false;
  const churn = (async () => {
    for (let i = 0; !done; i++) {
      await rm(join(folder, String(i)));
      const name = String(i + COUNT);
      await writeFile(join(incoming, name), name);
      await rename(join(incoming, name), join(folder, name));
    }
  })();
  try {
    return await work();
  } finally {
    done = true;
    await churn;
  }
}

describe('the embedded database while a server holds it', () => {
  it('refuses to back it up or restore it, with one line, and leaves it as it was', { timeout: 60_000 }, async () => {
    const dataDir = scratchFolder();
    const folder = pgliteFolder(dataDir);
    const env = { DATA_DIR: dataDir };
    const setup = await openPglite(folder);
    await setup.migrate();
    await setup.db.insert(users).values({ id: uuidv7(), email: 'held@example.com', passwordHash: 'x', name: 'Held' });
    await setup.close();
    const backup = join(scratchFolder(), 'backup');
    expect((await runBackupCli(['backup', backup], env)).code).toBe(0);

    const server = await openPglite(folder); // holds the lock as a running server does
    try {
      const refusedBackup = await runBackupCli(['backup', join(scratchFolder(), 'second')], env);
      expect(refusedBackup.code).toBe(1);
      expect(refusedBackup.output.trim()).toMatch(/^Backup needs the server stopped: The embedded database is in use by process \d+[^\n]+$/);
      expect(existsSync(join(dirname(backup), 'second'))).toBe(false);

      const refusedRestore = await runBackupCli(['restore', backup], env);
      expect(refusedRestore.code).toBe(1);
      expect(refusedRestore.output.trim()).toMatch(/^Restore needs the server stopped: The embedded database is in use by process \d+[^\n]+$/);
      expect((await server.db.select().from(users)).map((u) => u.email)).toEqual(['held@example.com']);
    } finally {
      await server.close();
    }
  });
});

describe.runIf(canUsePidNamespaces)('the embedded database held by a server in another container', () => {
  it('refuses a backup and a restore run beside it in a container of their own, where both are pid 1', { timeout: 120_000 }, async () => {
    const backup = join(scratchFolder(), 'backup');
    const dataDir = scratchFolder();
    const env = { DATA_DIR: dataDir, JWT_SECRET: 'backup-test-secret-0123456789-0123456789' };
    const setup = await openPglite(pgliteFolder(dataDir));
    await setup.migrate();
    await setup.close();
    expect((await runBackupCli(['backup', backup], env)).code).toBe(0);

    const server = await spawnServer(env, { ownPidNamespace: true });
    try {
      await waitUntilServing(server);
      expect(readFileSync(join(dataDir, 'pglite.lock'), 'utf8')).toMatch(/^1 /); // pid 1, as in a container
      for (const [command, folder] of [['backup', join(scratchFolder(), 'second')], ['restore', backup]] as const) {
        const refused = await runBackupCli([command, folder], env, { ownPidNamespace: true });
        expect(refused.code, refused.output).toBe(1);
        expect(refused.output.trim()).toMatch(/^\w+ needs the server stopped: The embedded database is in use by process 1 in another PID namespace[^\n]+$/);
      }
      expect(existsSync(join(dataDir, 'pglite.lock')), 'the server keeps its lock').toBe(true);
    } finally {
      // unshare ignores SIGTERM while it waits; killed, it kills the server (--kill-child).
      server.child.kill('SIGKILL');
      await server.exited;
    }
    // Killed, as out of memory, it could not free its lock, still fresh; a backup run at once is not
    // refused, as a restarted container is not: the lock's socket tells that nothing listens any more.
    const afterKill = await runBackupCli(['backup', join(scratchFolder(), 'after-kill')], env, { ownPidNamespace: true });
    expect(afterKill.code, afterKill.output).toBe(0);
  });
});

// A restore swaps each folder in with two renames: the live one set aside, then its replacement put in
// its place. Each test leaves the folders as a process killed between the two would.
describe('a restore cut between the two renames of a swap', () => {
  const cut = (folder: string, replacement: Record<string, string>) => {
    renameSync(folder, `${folder}.replaced`);
    mkdirSync(`${folder}.restoring`);
    for (const [name, content] of Object.entries(replacement)) writeFileSync(join(`${folder}.restoring`, name), content);
  };

  it('opens the embedded database that it had set aside, not an empty one in its place', { timeout: 60_000 }, async () => {
    const folder = pgliteFolder(scratchFolder());
    const setup = await openPglite(folder);
    await setup.migrate();
    await setup.db.insert(users).values({ id: uuidv7(), email: 'kept@example.com', passwordHash: 'x', name: 'Kept' });
    await setup.close();
    cut(folder, {});
    const reopened = await openPglite(folder);
    try {
      expect((await reopened.db.select().from(users)).map((u) => u.email)).toEqual(['kept@example.com']);
    } finally {
      await reopened.close();
    }
    expect(existsSync(`${folder}.replaced`)).toBe(false);
  });

  it("puts the uploads' replacement in place at the server's start: the database was restored before them", async () => {
    const dataDir = scratchFolder();
    const uploadsFolder = join(dataDir, 'files');
    mkdirSync(uploadsFolder);
    writeFileSync(join(uploadsFolder, 'old'), 'before the restore');
    cut(uploadsFolder, { new: 'from the backup' });
    const t = await startTestApp({ DATA_DIR: dataDir });
    await t.close();
    expect(readdirSync(uploadsFolder)).toEqual(['new']);
    expect(existsSync(`${uploadsFolder}.replaced`)).toBe(false);
  });

  it('starts a restore run again from the folder as it was, and leaves it so when this one fails too', async () => {
    const folder = join(scratchFolder(), 'files');
    mkdirSync(folder);
    writeFileSync(join(folder, 'old'), 'before the restore');
    cut(folder, { new: 'from the backup' });
    await expect(stageFolder(folder, () => Promise.reject(new Error('the disk is full')))).rejects.toThrow('the disk is full');
    expect(readFileSync(join(folder, 'old'), 'utf8')).toBe('before the restore');
    expect(readdirSync(dirname(folder))).toEqual(['files']);
  });
});

describe('what restore refuses before touching anything', () => {
  it('a folder that is not a backup, a backup of the other kind of database, a damaged one', { timeout: 60_000 }, async () => {
    const env = { DATA_DIR: scratchFolder() };
    const notBackup = scratchFolder();
    const refused = await runBackupCli(['restore', notBackup], env);
    expect(refused.code).toBe(1);
    expect(refused.output.trim()).toBe(`${notBackup} is not a backup: it has no manifest.json`);

    const writeManifest = (kind: string) =>
      writeFileSync(
        join(notBackup, 'manifest.json'),
        JSON.stringify({ format: 'chatbot-platform-backup', version: 1, kind, createdAt: new Date().toISOString() }),
      );
    writeManifest('postgres');
    const otherKind = await runBackupCli(['restore', notBackup], env);
    expect(otherKind.code).toBe(1);
    expect(otherKind.output.trim()).toBe(`${notBackup} is a backup of PostgreSQL: set DATABASE_URL to the database to restore it into`);

    writeManifest('pglite');
    mkdirSync(join(notBackup, 'files'));
    writeFileSync(join(notBackup, 'pglite.tar.gz'), randomBytes(4096));
    const damaged = await runBackupCli(['restore', notBackup], env);
    expect(damaged.code).toBe(1);
    expect(damaged.output.trim()).toMatch(/^\S+pglite\.tar\.gz is damaged: [^\n]+$/);
    expect(readdirSync(env.DATA_DIR).sort()).toEqual([]);

    // Gzip whose content is no tar: PGlite itself would crash the process on it.
    writeFileSync(join(notBackup, 'pglite.tar.gz'), gzipSync(Buffer.from('not a tar at all '.repeat(1000))));
    const notTar = await runBackupCli(['restore', notBackup], env);
    expect(notTar.code).toBe(1);
    expect(notTar.output.trim()).toBe(`${join(notBackup, 'pglite.tar.gz')} is damaged: not a PGlite data tarball`);
    expect(readdirSync(env.DATA_DIR).sort()).toEqual([]);

    // A tar that begins as a data folder's and is not one whole (a copy cut short): PGlite's start fails.
    const partOfOne = scratchFolder();
    writeFileSync(join(partOfOne, 'PG_VERSION'), '17\n');
    writeFileSync(join(notBackup, 'pglite.tar.gz'), gzipSync(execFileSync('tar', ['-cf', '-', '--format=ustar', '-C', partOfOne, 'PG_VERSION'])));
    const cut = await runBackupCli(['restore', notBackup], env);
    expect(cut.code).toBe(1);
    expect(cut.output.trim()).toMatch(/^\S+pglite\.tar\.gz is damaged: PGlite cannot open the database it holds \([^\n]+\); nothing was restored$/);
    expect(readdirSync(env.DATA_DIR).sort()).toEqual([]);

    const nowhere = join(scratchFolder(), 'no-data-dir');
    const nothing = await runBackupCli(['backup', join(scratchFolder(), 'backup')], { DATA_DIR: nowhere });
    expect(nothing.code).toBe(1);
    expect(nothing.output.trim()).toBe(`No embedded database in ${join(nowhere, 'pglite')}: nothing to back up (check DATA_DIR)`);
    expect(existsSync(nowhere)).toBe(false);

    const usage = await runBackupCli(['backup'], env);
    expect(usage.code).toBe(1);
    expect(usage.output.trim()).toMatch(/^Usage: /);
  });
});

describe('a PostgreSQL backup that cannot start', () => {
  it('says why in one line when the database cannot be reached, and leaves no folder', async () => {
    const env = { DATABASE_URL: `postgres://postgres@127.0.0.1:${await freePort()}/nowhere`, DATA_DIR: scratchFolder() };
    const backup = join(scratchFolder(), 'backup');
    const refused = await runBackupCli(['backup', backup], env);
    expect(refused.code).toBe(1);
    expect(refused.output.trim()).toMatch(/^Could not take the database's snapshot with the files table held: connect ECONNREFUSED [^\n]+$/);
    expect(existsSync(backup)).toBe(false);
  });

  it('says why in one line when the connection is closed as it starts (a proxy whose database is down), and leaves no folder', async () => {
    const proxy = createServer((socket) => socket.on('data', () => socket.end()));
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    try {
      const env = { DATABASE_URL: `postgres://postgres@127.0.0.1:${(proxy.address() as AddressInfo).port}/chat`, DATA_DIR: scratchFolder() };
      const backup = join(scratchFolder(), 'backup');
      const refused = await runBackupCli(['backup', backup], env);
      expect(refused.code, refused.output).toBe(1);
      expect(refused.output.trim()).toMatch(/^Could not take the database's snapshot with the files table held: [^\n]+$/);
      expect(existsSync(backup)).toBe(false);
      expect(existsSync(`${backup}.partial`)).toBe(false);
    } finally {
      await new Promise((resolve) => proxy.close(resolve));
    }
  });
});

describe.runIf(process.env.TEST_DATABASE_URL)('a PostgreSQL backup through every DATABASE_URL the service accepts', () => {
  /** Runs `run` on a new target database, its DATA_DIR and URL, and drops it afterwards. */
  async function onTarget(run: (target: Target, dataDir: string, url: URL) => Promise<void>) {
    await withTarget(async (target, dataDir) => {
      await run(target, dataDir, new URL(target.env.DATABASE_URL!));
    });
  }
  /** Backs up into a new folder with `env`, which must succeed; the folder. */
  async function backedUp(env: Record<string, string>) {
    const backup = join(scratchFolder(), 'backup');
    const made = await runBackupCli(['backup', backup], env);
    expect(made.code, made.output).toBe(0);
    return backup;
  }

  // Taken before a migration that added a foreign key to one of its tables (0014's), a backup could not be
  // restored over the migrated database: pg_restore failed, dropping the table the key depends on, in words
  // that said neither why nor what to do.
  it('refuses, changing nothing, a backup older than the schema, and says to restore it into an empty database', { timeout: 120_000 }, () =>
    onTarget(async (target, dataDir) => {
      const { env, backup } = await backUpThenChange(dataDir, target);
      await target.withDb((db) => db.execute(sql`create table later_notes (project_id uuid constraint later_notes_project_fk references projects (id))`));
      await expectNothingRestored(
        await runBackupCli(['restore', backup], env),
        /^Nothing was restored: the backup is older than this database's schema \(public\.later_notes\.later_notes_project_fk came with a later migration\)\. Restore it into an empty database/,
        target,
        dataDir,
      );
    }));

  it('backs up and restores through options only the Node driver reads (uselibpqcompat, ssl)', { timeout: 120_000 }, () =>
    onTarget(async (target, dataDir) => {
      // The first is what pg's own warning about sslmode=require tells operators to write.
      for (const options of ['uselibpqcompat=true&sslmode=disable', 'ssl=0']) {
        const env = { DATA_DIR: dataDir, DATABASE_URL: `${target.env.DATABASE_URL}?${options}` };
        const restored = await runBackupCli(['restore', await backedUp(env)], env);
        expect(restored.code, restored.output).toBe(0);
      }
    }));

  it('backs up through a URL whose host is a query parameter and whose password is in the user part (Cloud SQL: user:password@/db?host=/cloudsql/…)', { timeout: 60_000 }, () =>
    onTarget(async (_target, dataDir, url) => {
      const password = url.password || 'unused-under-trust';
      await backedUp({ DATA_DIR: dataDir, DATABASE_URL: `postgres://${url.username}:${password}@${url.pathname}?host=${url.hostname}&port=${url.port || 5432}` });
    }));

  it("puts no password on pg_dump's command line, which every local user can read, wherever the URL holds it", { timeout: 60_000 }, () =>
    onTarget(async (_target, dataDir, url) => {
      const password = url.password ? decodeURIComponent(url.password) : 'hunter2-secret';
      // A pg_dump that notes its own command line as ps shows it, then runs the real one.
      const bin = scratchFolder();
      const seen = join(bin, 'command-lines');
      writeFileSync(join(bin, 'pg_dump'), `#!/bin/sh\ntr '\\0' ' ' < /proc/$$/cmdline >> '${seen}'\necho >> '${seen}'\nexec '${findPostgresTool('pg_dump')}' "$@"\n`, { mode: 0o755 });
      url.password = '';
      for (const DATABASE_URL of [`postgres://${url.username}:${encodeURIComponent(password)}@${url.host}${url.pathname}`, `${url.toString()}?password=${encodeURIComponent(password)}`]) {
        await backedUp({ DATA_DIR: dataDir, DATABASE_URL, PATH: `${bin}:${process.env.PATH}` });
      }
      const commandLines = readFileSync(seen, 'utf8');
      expect(commandLines.trim().split('\n')).toHaveLength(2);
      expect(commandLines).not.toContain('password=');
      expect(commandLines).not.toContain(`:${encodeURIComponent(password)}@`);
    }));

  it('keeps its snapshot and its hold on the files table through a dump longer than the database lets a transaction idle', { timeout: 60_000 }, () =>
    onTarget(async (target, dataDir, url) => {
      const holder = new pg.Client({ connectionString: url.toString() });
      const watcher = new pg.Client({ connectionString: url.toString() });
      try {
        // Managed PostgreSQL services and careful DBAs set this for the application's database or role.
        await target.withDb((db) => db.execute(sql.raw(`alter database "${url.pathname.slice(1)}" set idle_in_transaction_session_timeout = '1s'`)));
        await Promise.all([holder.connect(), watcher.connect()]);
        // pg_dump held for a few seconds, as a large database or a slow disk holds it.
        await holder.query('set idle_in_transaction_session_timeout = 0; begin; lock table prompts in access exclusive mode');
        const backingUp = backedUp({ DATA_DIR: dataDir, DATABASE_URL: url.toString() });
        await waitUntil(() => waitingOnLock(watcher, `application_name = 'pg_dump'`));
        await sleep(3_000);
        await holder.query('commit');
        await backingUp;
      } finally {
        await Promise.all([holder.end(), watcher.end()]);
      }
    }));
});

describe('libpqConnection', () => {
  it('asks of pg_dump and pg_restore the SSL the driver asks for, and puts no secret in their dbname', () => {
    const mode = (options: string) => libpqConnection(`postgres://app:secret@db.example.com/chat?${options}`).environment.PGSSLMODE;
    expect(mode('ssl=true')).toBe('require');
    expect(mode('ssl=1')).toBe('require');
    expect(mode('ssl=0')).toBe('disable');
    expect(mode('sslmode=no-verify')).toBe('require');
    expect(mode('sslmode=verify-full')).toBe('verify-full');
    expect(mode('application_name=x')).toBeUndefined();
    const { environment, dbname } = libpqConnection("postgres://app:s%40cret@/it's%20chat?host=/cloudsql/p:r:i&password=other");
    expect(environment).toMatchObject({ PGHOST: '/cloudsql/p:r:i', PGUSER: 'app', PGPASSWORD: 'other' });
    expect(dbname).toBe("dbname='it\\'s chat'");
  });
});
