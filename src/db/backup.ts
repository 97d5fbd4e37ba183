import { existsSync, mkdirSync, realpathSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { z } from 'zod';
import type { Config } from '../config.js';
import { pgliteFolder } from './database.js';
import { DatabaseLockedError, lockPglite } from './pglite-lock.js';
import { copyUploads, namedFilesIn } from './backup-files.js';
import { pgliteStore, requirePgliteDatabase } from './backup-pglite.js';
import { postgresStore } from './backup-postgres.js';
import { BackupError, besides, type DatabaseStore, markRestoreCommitting, type NamedFile, restoreDone, settleCutSwap, settleRestore, stageFolder } from './backup-store.js';

export { BackupError };

/*
 * A backup is one folder the operator can move:
 *   manifest.json                          format, version, kind of database, date; the uploaded
 *                                          files the database names (key and size), and any it named
 *                                          that were not there to copy
 *   database.dump | pglite.tar.gz          the database (pg_dump custom format, or PGlite's data tarball)
 *   files/                                 a copy of DATA_DIR/files, the uploaded files
 */
const FORMAT = 'chatbot-platform-backup';
const manifestSchema = z.object({
  format: z.literal(FORMAT),
  version: z.literal(1),
  kind: z.enum(['postgres', 'pglite']),
  createdAt: z.iso.datetime(),
  // Absent from backups made before they were written: such a backup's files are not checked.
  files: z.array(z.object({ key: z.string(), size: z.number() })).optional(),
  missingFiles: z.array(z.string()).optional(),
});
export type BackupManifest = z.infer<typeof manifestSchema>;

type BackupConfig = Pick<Config, 'DATABASE_URL' | 'DATA_DIR'>;

/** Where uploaded files live; the files module stores them there. */
const uploadsFolder = (config: BackupConfig) => join(config.DATA_DIR, 'files');

/**
 * Writes a backup of the configured database and the uploaded files into `target`, a folder that must
 * not exist yet. It appears there only once complete. On PostgreSQL the service may keep running (the
 * dump is one consistent snapshot, and files are copied while their rows are locked against changes);
 * the embedded database must be stopped.
 */
export async function createBackup(config: BackupConfig, target: string): Promise<BackupManifest> {
  const folder = resolve(target);
  if (existsSync(folder)) throw new BackupError(`${folder} already exists: name a new folder for the backup`);
  refuseInsideReplacedFolders(config, folder);
  const partial = `${folder}.partial`;
  // Before the embedded database's lock, whose taking creates DATA_DIR: a wrong DATA_DIR is left as it was.
  if (!config.DATABASE_URL && !existsSync(config.DATA_DIR)) requirePgliteDatabase(pgliteFolder(config.DATA_DIR));
  await mkdir(dirname(partial), { recursive: true });
  // It holds every password hash, conversation and upload: for its owner only, as the live data is.
  // Made here or refused: two backups into one folder at once (a cron job and a hand) wrote into one
  // partial folder, and one of them named the result complete without its database.
  await mkdir(partial, { mode: 0o700 }).catch((error: NodeJS.ErrnoException) => {
    if (error.code !== 'EEXIST') throw error;
    throw new BackupError(`${partial} exists: another backup is writing ${folder}, or one was cut short (then remove ${partial})`);
  });
  try {
    return await withStore(config, 'Backup', async (store) => {
      // What a restore cut short left is settled as a start settles it: the backup holds what a server would serve.
      if (store.kind === 'pglite') await settleCutSwap(pgliteFolder(config.DATA_DIR), 'back');
      await settleRestore(config.DATA_DIR, [[uploadsFolder(config), 'forward']]);
      if (store.kind === 'pglite') requirePgliteDatabase(pgliteFolder(config.DATA_DIR));
      const copy = join(partial, 'files');
      let named: NamedFile[] = [];
      await store.dump(join(partial, store.fileName), async (rows) => {
        named = rows;
        await copyUploads(uploadsFolder(config), copy, { required: rows.length > 0 });
      });
      // Checked in the copy, once the files table is no longer held against writes.
      const { held, missing } = await namedFilesIn(copy, named);
      // A folder of none of them is another one (a DATA_DIR of another install, an empty one made by
      // hand): restored, such a backup would delete every upload. Some missing is bytes lost before,
      // which the backup says, but cannot bring back.
      if (named.length > 0 && held.length === 0) {
        throw new BackupError(`${uploadsFolder(config)} holds none of the ${named.length} uploaded files the database names: check DATA_DIR`);
      }
      const manifest: BackupManifest = {
        format: FORMAT,
        version: 1,
        kind: store.kind,
        createdAt: new Date().toISOString(),
        files: held,
        ...(missing.length > 0 && { missingFiles: missing }),
      };
      await writeFile(join(partial, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
      await rename(partial, folder);
      return manifest;
    });
  } catch (error) {
    await rm(partial, { recursive: true, force: true });
    throw error;
  }
}

/**
 * Replaces the configured database and the uploaded files with those of the backup in `source`. Stop
 * the service first: the embedded database refuses while a server holds it; PostgreSQL cannot tell.
 */
export async function restoreBackup(config: BackupConfig, source: string): Promise<BackupManifest> {
  const folder = resolve(source);
  refuseInsideReplacedFolders(config, folder);
  const manifest = await readManifest(folder);
  return withStore(config, 'Restore', async (store) => {
    if (manifest.kind !== store.kind) {
      throw new BackupError(
        manifest.kind === 'postgres'
          ? `${folder} is a backup of PostgreSQL: set DATABASE_URL to the database to restore it into`
          : `${folder} is a backup of the embedded database: unset DATABASE_URL to restore it under DATA_DIR`,
      );
    }
    for (const part of [store.fileName, 'files']) {
      if (!existsSync(join(folder, part))) throw new BackupError(`${folder} is incomplete: ${part} is missing`);
    }
    const { missing } = await namedFilesIn(join(folder, 'files'), manifest.files ?? []);
    if (missing.length > 0) {
      throw new BackupError(`Nothing was restored: ${folder} is damaged: ${missing.length} of its uploaded files are missing or cut short (${missing[0]}…)`);
    }
    await store.check?.(join(folder, store.fileName));
    await restoreInOrder(config, folder, store);
    return manifest;
  });
}

/**
 * The files are copied first, beside the live ones, so a full disk or an unreadable file in the backup
 * fails before anything has changed. Then the database (all or nothing), and only once it is restored
 * are the copied files swapped in for the live ones. From the database's point of no return to the
 * files in place, a mark under DATA_DIR says the restore is to be finished: a start (or this command
 * run again) that finds it puts the staged folders in. A restore cut short before had changed nothing.
 */
async function restoreInOrder(config: BackupConfig, folder: string, store: DatabaseStore): Promise<void> {
  const uploads = uploadsFolder(config);
  // From the folders as they were before a restore cut short, or as it left them past its point of no return.
  const folders = [uploads, ...(store.kind === 'pglite' ? [pgliteFolder(config.DATA_DIR)] : [])];
  await settleRestore(config.DATA_DIR, folders.map((live) => [live, 'back']));
  const notCopied = (error: Error) => new BackupError(`Nothing was restored: the backup's files could not be copied: ${error.message}`);
  // A folder that cannot be replaced is refused before the copy, in words of its own.
  const staged = await stageFolder(uploads, (staging) =>
    copyUploads(join(folder, 'files'), staging).catch((error: Error) => {
      throw notCopied(error);
    }),
  ).catch((error: Error) => {
    throw error instanceof BackupError ? error : notCopied(error);
  });
  let committing = false;
  try {
    await store.restore(join(folder, store.fileName), async () => {
      await markRestoreCommitting(config.DATA_DIR);
      committing = true;
    });
  } catch (error) {
    if (!committing) await staged.discard();
    throw error;
  }
  await staged.commit().catch((error: Error) => {
    throw new BackupError(`The database was restored but the files were not (the next start puts them in): ${error.message}`);
  });
  await restoreDone(config.DATA_DIR);
}

/**
 * Refuses a backup folder inside one that a restore replaces as a whole (the uploaded files, the embedded
 * database, or one of their copies of a swap): a backup written into the files would copy itself into
 * itself until its path was too long, one in the database's folder would be in the next backup, and
 * either would be deleted by its own restore. Paths are compared as the file system resolves them.
 */
function refuseInsideReplacedFolders(config: BackupConfig, folder: string): void {
  const dataDir = realLocation(config.DATA_DIR);
  const at = realLocation(folder);
  for (const live of [join(dataDir, 'files'), pgliteFolder(dataDir)]) {
    const { staging, previous } = besides(live);
    const inside = [live, staging, previous].find((replaced) => at === replaced || at.startsWith(`${replaced}${sep}`));
    if (inside) throw new BackupError(`${folder} is inside ${inside}, which a restore replaces: keep backups outside it (in DATA_DIR/backups, or on another volume)`);
  }
}

/** `path` with its existing part resolved through the file system (symbolic links, `..`); the rest as written. */
function realLocation(path: string): string {
  const rest: string[] = [];
  let at = resolve(path);
  while (!existsSync(at) && dirname(at) !== at) {
    rest.unshift(basename(at));
    at = dirname(at);
  }
  return join(realpathSync(at), ...rest);
}

async function readManifest(folder: string): Promise<BackupManifest> {
  const file = join(folder, 'manifest.json');
  const text = await readFile(file, 'utf8').catch(() => {
    throw new BackupError(`${folder} is not a backup: it has no manifest.json`);
  });
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    // reported below, as any other manifest that is not ours
  }
  const parsed = manifestSchema.safeParse(json);
  if (!parsed.success) throw new BackupError(`${file} is not a manifest of this format (${FORMAT} version 1)`);
  return parsed.data;
}

/**
 * Runs `use` with the configured database's store. The embedded one is locked meanwhile, as a server
 * locks it, so a backup or a restore never runs beside a server (nor beside each other).
 */
async function withStore<T>(config: BackupConfig, action: string, use: (store: DatabaseStore) => Promise<T>): Promise<T> {
  if (config.DATABASE_URL) return use(postgresStore(config.DATABASE_URL));
  const folder = pgliteFolder(config.DATA_DIR);
  mkdirSync(config.DATA_DIR, { recursive: true });
  let release: () => void;
  try {
    release = await lockPglite(folder);
  } catch (error) {
    if (error instanceof DatabaseLockedError) throw new BackupError(`${action} needs the server stopped: ${error.message}`);
    throw error;
  }
  try {
    return await use(pgliteStore(folder));
  } finally {
    release();
  }
}
