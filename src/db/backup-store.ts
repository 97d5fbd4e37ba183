import { existsSync } from 'node:fs';
import { chmod, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { getTableName } from 'drizzle-orm';
import { flush } from '../flush.js';
import { files } from './schema.js';

/** A backup or restore that cannot go on; its message is the one line the command prints. */
export class BackupError extends Error {
  override name = 'BackupError';
}

/** How one kind of database is saved to, and brought back from, one file of a backup folder. */
export interface DatabaseStore {
  readonly kind: 'postgres' | 'pglite';
  /** The file's name inside a backup folder. */
  readonly fileName: string;
  /**
   * Writes the database to `file`, then runs `alongside` (the copy of the uploaded files) while the
   * file rows cannot change, so the copy matches the dump: no row without its bytes. `named`: the files
   * the dump's rows name (`NAMED_FILES`).
   */
  dump(file: string, alongside: (named: NamedFile[]) => Promise<void>): Promise<void>;
  /**
   * Replaces the whole database with the file's, or leaves it as it was when that fails. Runs
   * `committing` once nothing but putting the replacement in place is left (the embedded database's
   * folder complete beside the live one), or once it is in place (PostgreSQL, whose restore commits in
   * one transaction): from there on the restore is finished whatever cuts it short.
   */
  restore(file: string, committing: () => Promise<void>): Promise<void>;
  /** Refuses, before anything is copied or changed, a file that cannot be restored over this database. */
  check?(file: string): Promise<void>;
}

/** A folder's replacement, complete beside it and not yet in its place. */
export interface StagedFolder {
  /** Sets the live folder aside and puts the replacement in its place. */
  commit(): Promise<void>;
  /** Removes the replacement; the live folder stays as it was. */
  discard(): Promise<void>;
}

/** An uploaded file a database's row names: where its bytes are under the files' folder, and how many. */
export interface NamedFile {
  key: string;
  size: number;
}

/**
 * The files a database's rows name, as `NamedFile`s: the files module keeps each under `<project>/<file>`
 * (its `storageKey`), which `test/ops/backup.test.ts` holds it to.
 */
export const NAMED_FILES = `select project_id || '/' || id as key, size::float8 as size from ${getTableName(files)}`;

/** Where `folder`'s replacement is written, and where `folder` is set aside while the two are swapped. */
export const besides = (folder: string) => ({ staging: `${folder}.restoring`, previous: `${folder}.replaced` });

/**
 * The mark, under DATA_DIR, of a restore past its point of no return (see `DatabaseStore.restore`), until
 * both the database and the uploaded files are in place: a start, or a restore run again, that finds it
 * puts in place what that restore had staged. Without it, the database was replaced and the files were
 * not when a restore was killed while it removed the database it had set aside (which takes a while):
 * the next start served the backup's rows with the files of before.
 */
const restoreMark = (dataDir: string) => join(dataDir, 'restore.committing');

/** Marks the restore of the folders under `dataDir` as past its point of no return. */
export async function markRestoreCommitting(dataDir: string): Promise<void> {
  await writeFile(restoreMark(dataDir), '');
  await flush(dataDir);
}

/** Removes the mark of a restore whose folders are all in place. */
export async function restoreDone(dataDir: string): Promise<void> {
  await rm(restoreMark(dataDir), { force: true });
}

/**
 * Settles the folders under `dataDir` that a restore cut short left (`settleCutSwap`, each the given way
 * should the restore have been cut before its point of no return), then removes its mark.
 */
export async function settleRestore(dataDir: string, folders: [folder: string, way: 'back' | 'forward'][]): Promise<void> {
  for (const [folder, way] of folders) await settleCutSwap(folder, way);
  await restoreDone(dataDir);
}

/**
 * Settles a swap of `folder` that was cut (the process killed, the power lost) between its two renames:
 * the live folder missing, set aside beside its complete replacement. `back` puts the folder that was set
 * aside in its place again, `forward` puts the replacement in. Without this, the embedded database
 * started empty in the folder's place, its data beside it, and the next restore deleted that data before
 * it began.
 */
export async function settleCutSwap(folder: string, way: 'back' | 'forward'): Promise<void> {
  const { staging, previous } = besides(folder);
  // Past its point of no return: what it staged goes in, whichever of its renames it had made.
  if (existsSync(restoreMark(dirname(folder)))) {
    if (existsSync(staging)) {
      if (existsSync(folder)) {
        await rm(previous, { recursive: true, force: true });
        await rename(folder, previous);
      }
      await rename(staging, folder);
    }
    if (existsSync(folder)) await rm(previous, { recursive: true, force: true });
    return;
  }
  if (existsSync(folder) || !existsSync(previous)) return;
  if (way === 'forward' && existsSync(staging)) {
    await rename(staging, folder);
    await rm(previous, { recursive: true, force: true });
  } else {
    await rename(previous, folder);
  }
}

/**
 * Writes the replacement of `folder` with `fill` into a new sibling folder, leaving `folder` untouched
 * until `commit`. Nothing of the old content survives into the new one (a replacement, never a merge).
 */
export async function stageFolder(folder: string, fill: (staging: string) => Promise<unknown>): Promise<StagedFolder> {
  const { staging, previous } = besides(folder);
  // A restore run again after one that was cut starts from the folders as they were before that one.
  await settleCutSwap(folder, 'back');
  // Either may be left by a restore that was interrupted; neither holds anything the live folder lacks.
  await rm(staging, { recursive: true, force: true });
  await rm(previous, { recursive: true, force: true });
  await requireSwappable(folder, previous);
  const discard = () => rm(staging, { recursive: true, force: true });
  try {
    await fill(staging);
    // What a restore brings back (every password hash and conversation, the uploads) is the owner's
    // alone, as the live folders are: PGlite makes its folder readable by all.
    await chmod(staging, 0o700);
  } catch (error) {
    await discard();
    throw error;
  }
  return {
    discard,
    async commit() {
      await rename(folder, previous).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') throw error;
      });
      await rename(staging, folder);
      await rm(previous, { recursive: true, force: true });
    },
  };
}

/**
 * Sets `folder` aside and back, as a commit will, before anything is written or changed: a mount point
 * (a volume of its own, as a container may mount at `DATA_DIR/files`) cannot be renamed (EBUSY), and a
 * restore found so only after the database was replaced, which then held the backup's rows beside the
 * live files. A cut between the two renames is settled as any other (`settleCutSwap`).
 */
async function requireSwappable(folder: string, aside: string): Promise<void> {
  try {
    await rename(folder, aside);
  } catch (error) {
    const { code, message } = error as NodeJS.ErrnoException;
    if (code === 'ENOENT') return;
    throw new BackupError(
      `Nothing was restored: ${folder} cannot be replaced as a whole (${message})${code === 'EBUSY' ? ': it is a mount point; mount the volume at the folder above it instead' : ''}`,
    );
  }
  await rename(aside, folder);
}
