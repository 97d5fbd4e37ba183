import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gunzip } from 'node:zlib';
import { PGlite, type PGliteOptions } from '@electric-sql/pglite';
import { BackupError, type DatabaseStore, NAMED_FILES, type NamedFile, stageFolder } from './backup-store.js';

/**
 * The embedded database as PGlite's own tarball of its data folder (`dumpDataDir`, restored with
 * `loadDataDir`). It is taken through PGlite, so it holds what PostgreSQL itself sees, and a restore
 * proves the tarball opens before the live folder is replaced. The copy is physical: it restores with
 * the same PGlite major version, and it passes through memory whole (fine at embedded sizes).
 * The caller holds the folder's lock, so no server writes meanwhile.
 */
export function pgliteStore(folder: string): DatabaseStore {
  return {
    kind: 'pglite',
    fileName: 'pglite.tar.gz',
    // Nothing else can write meanwhile: the caller holds the folder's lock, and has checked that the
    // folder holds a database (`requirePgliteDatabase`) before taking it.
    async dump(file, alongside) {
      const named = await withPglite(folder, {}, async (db) => {
        const { rows } = await db.query<NamedFile>(NAMED_FILES);
        const tarball = await db.dumpDataDir('gzip');
        await writeFile(file, new Uint8Array(await tarball.arrayBuffer()));
        return rows;
      });
      await alongside(named);
    },
    async restore(file, committing) {
      // Unpacked here: PGlite would unpack it too, but a damaged file then crashes the process from
      // inside its decompression stream instead of failing this call.
      const tar = await promisify(gunzip)(await readFile(file)).catch((error: Error) => {
        throw new BackupError(`${file} is damaged: ${error.message}`);
      });
      // PGlite reads anything else as a gzip it must unpack, which fails inside a stream it never
      // awaits: an unhandled rejection that ends the process and leaves the staging folder behind.
      if (!startsWithTarHeader(tar)) throw new BackupError(`${file} is damaged: not a PGlite data tarball`);
      const staged = await stageFolder(folder, (staging) =>
        withPglite(staging, { loadDataDir: new Blob([tar]) }, (db) => db.query('select 1')).catch((error: Error & { code?: unknown }) => {
          // A tarball cut short, or of another PGlite version, fails PGlite's start with words of its own
          // ("PGlite failed to initialize properly"); a failure of the system's (a full disk) has a code.
          if (error.code !== undefined) throw error;
          throw new BackupError(`${file} is damaged: PGlite cannot open the database it holds (${error.message}); nothing was restored`);
        }),
      );
      await committing().catch(async (error: unknown) => {
        await staged.discard();
        throw error;
      });
      await staged.commit();
    },
  };
}

/** Refuses a backup of `folder` when it holds no database (PGlite would create an empty one there). */
export function requirePgliteDatabase(folder: string): void {
  if (!existsSync(join(folder, 'PG_VERSION'))) {
    throw new BackupError(`No embedded database in ${folder}: nothing to back up (check DATA_DIR)`);
  }
}

/** A tar archive begins with a header block carrying the ustar magic and a checksum of its own bytes. */
function startsWithTarHeader(tar: Buffer): boolean {
  const BLOCK = 512;
  const CHECKSUM = { offset: 148, length: 8 };
  if (tar.length < BLOCK || tar.toString('latin1', 257, 262) !== 'ustar') return false;
  const recorded = Number.parseInt(tar.toString('latin1', CHECKSUM.offset, CHECKSUM.offset + CHECKSUM.length).trim(), 8);
  // The checksum is the sum of the header's bytes, counting its own field as spaces.
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) {
    const inField = i >= CHECKSUM.offset && i < CHECKSUM.offset + CHECKSUM.length;
    sum += inField ? 0x20 : tar[i]!;
  }
  return sum === recorded;
}

async function withPglite<T>(folder: string, options: PGliteOptions, use: (db: PGlite) => Promise<T>): Promise<T> {
  const db = new PGlite(folder, options);
  try {
    await db.waitReady;
    return await use(db);
  } finally {
    await db.close();
  }
}
