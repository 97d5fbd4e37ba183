import { rename, rm } from 'node:fs/promises';

/** A backup or restore that cannot go on; its message is the one line the command prints. */
export class BackupError extends Error {
  override name = 'BackupError';
}

/** How one kind of database is saved to, and brought back from, one file of a backup folder. */
export interface DatabaseStore {
  readonly kind: 'postgres' | 'pglite';
  /** The file's name inside a backup folder. */
  readonly fileName: string;
  dump(file: string): Promise<void>;
  /** Replaces the whole database with the file's, or leaves it as it was when that fails. */
  restore(file: string): Promise<void>;
}

/**
 * Replaces `folder` with what `fill` writes into a new sibling folder. The old folder is set aside only
 * once the new one is complete, so a restore that fails midway leaves the data as it was, and nothing of
 * the old content survives into the new one (a replacement, never a merge).
 */
export async function replaceFolder(folder: string, fill: (staging: string) => Promise<unknown>): Promise<void> {
  const staging = `${folder}.restoring`;
  const previous = `${folder}.replaced`;
  // Either may be left by a restore that was interrupted; neither holds anything the live folder lacks.
  await rm(staging, { recursive: true, force: true });
  await rm(previous, { recursive: true, force: true });
  try {
    await fill(staging);
  } catch (error) {
    await rm(staging, { recursive: true, force: true });
    throw error;
  }
  await rename(folder, previous).catch((error: NodeJS.ErrnoException) => {
    if (error.code !== 'ENOENT') throw error;
  });
  await rename(staging, folder);
  await rm(previous, { recursive: true, force: true });
}
