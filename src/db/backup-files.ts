import { type Dirent, existsSync } from 'node:fs';
import { copyFile, mkdir, readdir, stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { BackupError, type NamedFile } from './backup-store.js';

/** The file storage's staging folder (see LocalDiskStorage): uploads in progress, which no row names yet. */
const STAGING = 'tmp';

/**
 * Copies the uploaded files under `from` into `to`, a new folder (made with its parents: a restore may
 * be the first to write under DATA_DIR), keeping their modification times. `from` missing is no files,
 * unless they are `required` (the database names some: `from` is then the wrong folder, and a backup
 * without them would delete every upload when it is restored).
 * Left out: the staging folder `tmp/`, whose temporaries are uploads still being written (or strays of a
 * process that died), renamed away as uploads finish.
 * The service may run meanwhile, so an entry that vanishes between the listing and its copy is skipped:
 * it was not there to copy.
 */
export async function copyUploads(from: string, to: string, { required = false } = {}): Promise<void> {
  if (required && !existsSync(from)) throw new BackupError(`${from} does not exist, though the database names uploaded files: check DATA_DIR`);
  await mkdir(to, { recursive: true });
  await copyEntries(from, to, (entry) => entry.name !== STAGING);
}

/**
 * Which of the `named` files `folder` holds whole (their bytes there, as many as their rows say), and
 * the keys of those it does not.
 */
export async function namedFilesIn(folder: string, named: readonly NamedFile[]): Promise<{ held: NamedFile[]; missing: string[] }> {
  const held: NamedFile[] = [];
  const missing: string[] = [];
  for (const file of named) {
    const stats = await vanishedAs(stat(join(folder, file.key)), undefined);
    if (stats?.isFile() && stats.size === file.size) held.push(file);
    else missing.push(file.key);
  }
  return { held, missing };
}

async function copyEntries(from: string, to: string, keep: (entry: Dirent) => boolean = () => true): Promise<void> {
  const entries = await vanishedAs(readdir(from, { withFileTypes: true }), []);
  for (const entry of entries.filter(keep)) {
    const source = join(from, entry.name);
    const target = join(to, entry.name);
    if (entry.isDirectory()) {
      await mkdir(target);
      await copyEntries(source, target);
    } else if (entry.isFile()) {
      await copyRegularFile(source, target);
    } else {
      // Reading a FIFO would wait forever for a writer; nothing the service writes is anything but a file.
      throw new BackupError(`${source} is not a file nor a folder: it cannot be copied`);
    }
  }
}

async function copyRegularFile(source: string, target: string): Promise<void> {
  const stats = await vanishedAs(stat(source), undefined);
  if (!stats) return;
  const copied = await vanishedAs(copyFile(source, target).then(() => true), false);
  if (copied) await utimes(target, stats.atime, stats.mtime);
}

/** `promise`'s value, or `value` when what it reads is gone (ENOENT). */
function vanishedAs<T>(promise: Promise<T>, value: T): Promise<T> {
  return promise.catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return value;
    throw error;
  });
}
