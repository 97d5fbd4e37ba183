import { createHash, randomUUID } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, rmdir, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { pathToFileURL } from 'node:url';
import type { ByteRange } from './ranges.js';
import { flush } from '../../flush.js';

/** Bytes written in full to a temporary place, not yet under any key. */
export interface StagedBytes {
  size: number;
  /** Hex SHA-256 of the bytes. */
  sha256: string;
  /** Where they are meanwhile: a path on this machine, for readers that take one (the provider upload streams it from disk). */
  path: string;
}

/**
 * Where uploaded bytes live. A key is a relative name made of `/`-separated segments of letters,
 * digits, `-` and `_` (the files module uses `<projectId>/<fileId>`), never anything a client chose.
 * Bytes are written first and named after: a file's id, which orders its list, is taken when its row is
 * written, not when its upload began.
 */
export interface FileStorage {
  /** Writes `source` whole or not at all: a failing source leaves nothing behind. */
  stage(source: AsyncIterable<Uint8Array>): Promise<StagedBytes>;
  /** Puts staged bytes under `key`, durably; resolves with where they are, as a URL (`file:///…` on local disk). */
  keep(staged: StagedBytes, key: string): Promise<string>;
  /** Removes staged bytes that are not to be kept. */
  drop(staged: StagedBytes): Promise<void>;
  /** The bytes under `key`, or `range` of them. Rejects (ENOENT, see `bytesGone`) before anything is read when there are none. */
  open(key: string, range?: ByteRange): Promise<Readable>;
  /** Removes the bytes under `key`; bytes already gone are not an error. */
  remove(key: string): Promise<void>;
}

const KEY = /^[\w-]+(\/[\w-]+)*$/;

/** How many times `keep` moves bytes into a folder that a removal keeps taking away, before it gives up. */
const KEEP_ATTEMPTS = 5;

/**
 * Whether `open` failed because the bytes are not there: those of a file deleted after its row was read
 * (a delete removes the row first, then the bytes), which is then as missing as if it had never been.
 */
export function bytesGone(error: unknown): boolean {
  return (error as NodeJS.ErrnoException | undefined)?.code === 'ENOENT';
}

/**
 * Files under `root` (DATA_DIR/files, which backups copy). A write goes to `root/tmp` first and is
 * renamed into place once complete and flushed to disk, so a crash leaves at worst a stray temporary
 * file, never a partial file under a key.
 */
export class LocalDiskStorage implements FileStorage {
  private readonly staging: string;

  constructor(private readonly root: string) {
    this.staging = join(root, 'tmp');
  }

  async stage(source: AsyncIterable<Uint8Array>): Promise<StagedBytes> {
    await mkdir(this.staging, { recursive: true });
    const temporary = join(this.staging, randomUUID());
    const hash = createHash('sha256');
    let size = 0;
    // Created before anything is read: a write stream opening the file itself could still be opening
    // it when a failing source makes the cleanup below remove it, and would then leave it behind.
    const file = await open(temporary, 'wx', 0o600);
    try {
      await pipeline(
        source,
        async function* (chunks: AsyncIterable<Uint8Array>) {
          for await (const chunk of chunks) {
            hash.update(chunk);
            size += chunk.byteLength;
            yield chunk;
          }
        },
        file.createWriteStream(),
      );
      await flush(temporary);
    } catch (error) {
      await rm(temporary, { force: true });
      throw error;
    }
    return { size, sha256: hash.digest('hex'), path: temporary };
  }

  async keep(staged: StagedBytes, key: string): Promise<string> {
    const target = this.localPath(key);
    const folder = dirname(target);
    for (let attempt = 1; ; attempt++) {
      try {
        const made = await mkdir(folder, { recursive: true });
        // A folder just made is durable only once the one holding it is flushed: else a crash could take
        // it away, and the bytes renamed into it, from under the row written next.
        for (let dir = folder; made !== undefined; dir = dirname(dir)) {
          await flush(dirname(dir));
          if (dir === made) break;
        }
        await rename(staged.path, target);
        break;
      } catch (error) {
        // The folder, made empty, was removed (see `remove`) before the bytes were in: between the two,
        // or within `mkdir` itself, which finds it there (EEXIST) and then fails to stat it (ENOENT).
        // Made again, if the staged bytes are still there to move.
        if (!bytesGone(error) || attempt === KEEP_ATTEMPTS || !(await exists(staged.path))) throw error;
      }
    }
    // The rename itself is durable only once the folder is flushed too.
    await flush(folder);
    return pathToFileURL(target).href;
  }

  async drop(staged: StagedBytes): Promise<void> {
    await rm(staged.path, { force: true });
  }

  /**
   * Removes the temporaries in the staging folder last written more than `olderThanMs` ago: what writes
   * of a process that died mid-way left there. Younger ones may be writes in progress of another
   * instance sharing the folder. Resolves with how many were removed.
   */
  async sweepStaging(olderThanMs: number): Promise<number> {
    const before = Date.now() - olderThanMs;
    let removed = 0;
    for (const name of await namesIn(this.staging)) {
      const path = join(this.staging, name);
      if (!(await writtenBefore(path, before))) continue;
      await rm(path, { force: true });
      removed++;
    }
    return removed;
  }

  /**
   * The keys of the bytes stored here that were last written more than `olderThanMs` ago (the
   * staging folder aside), at most `batchSize` at a time: what a sweep of bytes no longer wanted
   * looks through. A key's bytes keep the time they were written at when they are named. The folders
   * it finds empty it removes on its way: `remove` takes a folder with its last file, but a crash in
   * between, or an older version, left them, and nothing else ever comes back to them.
   */
  async *keysWrittenBefore(olderThanMs: number, batchSize: number): AsyncGenerator<string[]> {
    let batch: string[] = [];
    for await (const key of this.keysUnder('', Date.now() - olderThanMs)) {
      if (batch.push(key) < batchSize) continue;
      yield batch;
      batch = [];
    }
    if (batch.length) yield batch;
  }

  /** The keys under the folder `prefix`, as `keysWrittenBefore` lists them; returns whether it was empty. */
  private async *keysUnder(prefix: string, before: number): AsyncGenerator<string, boolean> {
    const names = await namesIn(join(this.root, prefix));
    for (const name of names) {
      const key = prefix ? `${prefix}/${name}` : name;
      if (key === 'tmp' || !KEY.test(key)) continue;
      const stats = await stat(join(this.root, key)).catch(() => undefined); // removed meanwhile
      if (stats?.isDirectory()) {
        // An upload may be moving bytes into it right now: rmdir removes only an empty folder, and
        // `keep` makes one again that went between its mkdir and its rename.
        if (yield* this.keysUnder(key, before)) await rmdir(join(this.root, key)).catch(() => {});
      } else if (stats?.isFile() && stats.mtimeMs < before) yield key;
    }
    return names.length === 0;
  }

  async open(key: string, range?: ByteRange): Promise<Readable> {
    const handle = await open(this.localPath(key), 'r');
    return handle.createReadStream(range && { start: range.start, end: range.end });
  }

  async remove(key: string): Promise<void> {
    const path = this.localPath(key);
    await rm(path, { force: true });
    // The folder goes with its last file (a deleted project's): rmdir removes only an empty one. A
    // folder that stays is empty and harmless, so its removal failing is no failure of this one.
    if (dirname(path) !== this.root) await rmdir(dirname(path)).catch(() => {});
  }

  private localPath(key: string): string {
    if (!KEY.test(key)) throw new Error(`Invalid storage key ${JSON.stringify(key)}`);
    return join(this.root, key);
  }
}

/** The entries of a folder; none when it does not exist (yet). */
async function namesIn(folder: string): Promise<string[]> {
  return readdir(folder).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return [];
    throw error;
  });
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Whether `path` is a file last written before `before` (ms since the epoch); false once it is gone. */
async function writtenBefore(path: string, before: number): Promise<boolean> {
  const stats = await stat(path).catch(() => undefined); // gone meanwhile: renamed into place or removed
  return Boolean(stats?.isFile() && stats.mtimeMs < before);
}
