import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LocalDiskStorage } from '../../src/modules/files/storage.js';
import { startTestApp } from '../support/app.js';

function stageText(storage: LocalDiskStorage, text: string) {
  return storage.stage(
    (async function* () {
      yield new TextEncoder().encode(text);
    })(),
  );
}

/** Resolves after `turns` turns of the event loop. */
async function later(turns: number): Promise<void> {
  for (let turn = 0; turn < turns; turn++) await new Promise(setImmediate);
}

describe('local disk storage', () => {
  it('leaves nothing behind when the source fails, even before its first byte', async () => {
    const root = mkdtempSync(join(tmpdir(), 'storage-test-'));
    const storage = new LocalDiskStorage(root);
    // Many at once: a temporary file still being opened when the failure's cleanup ran was left behind.
    const failures = Array.from({ length: 50 }, async (_, i) => {
      // eslint-disable-next-line require-yield -- a source that fails before yielding anything
      const failing = async function* (): AsyncGenerator<Uint8Array> {
        throw new Error(`cut ${i}`);
      };
      await expect(storage.stage(failing())).rejects.toThrow(`cut ${i}`);
    });
    await Promise.all(failures);
    expect(readdirSync(join(root, 'tmp'))).toEqual([]);
    expect(readdirSync(root)).toEqual(['tmp']);
  });

  it('removes a folder with its last file, and keeps the bytes moved into it as it goes', async () => {
    const root = mkdtempSync(join(tmpdir(), 'storage-test-'));
    const storage = new LocalDiskStorage(root);
    const staged = (text: string) =>
      storage.stage(
        (async function* () {
          yield new TextEncoder().encode(text);
        })(),
      );
    await storage.keep(await staged('a'), 'project/a');
    await storage.keep(await staged('b'), 'project/b');
    await storage.remove('project/a');
    expect(readdirSync(join(root, 'project'))).toEqual(['b']);
    await storage.remove('project/b');
    expect(existsSync(join(root, 'project'))).toBe(false);

    // A project's last file deleted while another is uploaded to it: the folder may go between the
    // upload's making it and its moving the bytes in.
    for (let i = 0; i < 300; i++) {
      await storage.keep(await staged('old'), 'race/old');
      const upload = await staged(`new ${i}`);
      await Promise.all([storage.remove('race/old'), storage.keep(upload, `race/new-${i}`)]);
      expect(readFileSync(join(root, 'race', `new-${i}`), 'utf8')).toBe(`new ${i}`);
      await storage.remove(`race/new-${i}`);
    }
    // An empty folder removed while an upload makes it: within mkdir, which finds it there and then
    // does not (ENOENT). An upload's failed cleanup removes a file that was never kept, and its folder.
    for (let i = 0; i < 300; i++) {
      mkdirSync(join(root, 'empty'), { recursive: true });
      const upload = await staged(`new ${i}`);
      await Promise.all([storage.remove('empty/never-kept'), storage.keep(upload, `empty/new-${i}`)]);
      expect(readFileSync(join(root, 'empty', `new-${i}`), 'utf8')).toBe(`new ${i}`);
      await storage.remove(`empty/new-${i}`);
    }
  });

  it('sweeps the temporaries older than it is told, and keeps the younger ones and everything stored', async () => {
    const root = mkdtempSync(join(tmpdir(), 'storage-test-'));
    const storage = new LocalDiskStorage(root);
    expect(await storage.sweepStaging(60_000)).toBe(0); // no staging folder yet
    const staged = await storage.stage(
      (async function* () {
        yield new TextEncoder().encode('stored');
      })(),
    );
    await storage.keep(staged, 'project/kept');
    const dayAgo = (Date.now() - 25 * 60 * 60 * 1000) / 1000;
    for (const name of ['left-by-a-crash', 'also-left']) {
      writeFileSync(join(root, 'tmp', name), 'partial');
      utimesSync(join(root, 'tmp', name), dayAgo, dayAgo);
    }
    writeFileSync(join(root, 'tmp', 'being-written'), 'partial');
    expect(await storage.sweepStaging(24 * 60 * 60 * 1000)).toBe(2);
    expect(readdirSync(join(root, 'tmp'))).toEqual(['being-written']);
    expect(readdirSync(join(root, 'project'))).toEqual(['kept']);
  });

  it('lists the keys of stored bytes older than it is told, in batches, and neither temporaries nor younger bytes', async () => {
    const root = mkdtempSync(join(tmpdir(), 'storage-test-'));
    const storage = new LocalDiskStorage(root);
    const collect = async (batchSize: number) => {
      const batches: string[][] = [];
      for await (const batch of storage.keysWrittenBefore(24 * 60 * 60 * 1000, batchSize)) batches.push(batch);
      return batches;
    };
    expect(await collect(2)).toEqual([]); // nothing stored yet
    const dayAgo = (Date.now() - 25 * 60 * 60 * 1000) / 1000;
    for (const key of ['a/one', 'a/two', 'b/three', 'b/deeper/four', 'young/five']) {
      const staged = await storage.stage(
        (async function* () {
          yield new TextEncoder().encode(key);
        })(),
      );
      await storage.keep(staged, key);
      if (!key.startsWith('young/')) utimesSync(join(root, key), dayAgo, dayAgo);
    }
    writeFileSync(join(root, 'tmp', 'left-by-a-crash'), 'partial');
    utimesSync(join(root, 'tmp', 'left-by-a-crash'), dayAgo, dayAgo);
    writeFileSync(join(root, 'b', 'not a key'), 'x');
    utimesSync(join(root, 'b', 'not a key'), dayAgo, dayAgo);

    const batches = await collect(3);
    expect(batches.map((batch) => batch.length)).toEqual([3, 1]);
    expect(batches.flat().sort()).toEqual(['a/one', 'a/two', 'b/deeper/four', 'b/three']);
  });

  it('removes the empty folders it finds while listing keys (a crash between a folder\'s last file and the folder), and no upload into one is lost', async () => {
    const root = mkdtempSync(join(tmpdir(), 'storage-test-'));
    const storage = new LocalDiskStorage(root);
    const list = async () => {
      for await (const batch of storage.keysWrittenBefore(0, 10)) expect(batch).toBeDefined();
    };
    await storage.keep(await stageText(storage, 'kept'), 'full/kept');
    // The staging folder is the storage's own, and a folder named as no key is not its to remove.
    for (const folder of ['left-empty', 'full/empty-within', 'lost+found']) mkdirSync(join(root, folder), { recursive: true });
    await list();
    expect(readdirSync(root).sort()).toEqual(['full', 'lost+found', 'tmp']);
    expect(readdirSync(join(root, 'full'))).toEqual(['kept']);

    // An upload into an empty folder as it is removed: between the upload's making it and its moving
    // the bytes in. The upload starts a little later each round, to meet the listing at each step.
    for (let i = 0; i < 300; i++) {
      mkdirSync(join(root, 'race'), { recursive: true });
      const upload = await stageText(storage, `new ${i}`);
      await Promise.all([list(), later(i % 10).then(() => storage.keep(upload, `race/new-${i}`))]);
      expect(readFileSync(join(root, 'race', `new-${i}`), 'utf8')).toBe(`new ${i}`);
      await storage.remove(`race/new-${i}`);
    }
  });

  it('is swept when the app starts, in the background', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'storage-test-'));
    const staging = join(dataDir, 'files', 'tmp');
    mkdirSync(staging, { recursive: true });
    const leftover = join(staging, 'left-by-a-crash');
    writeFileSync(leftover, 'partial');
    writeFileSync(join(staging, 'still-arriving'), 'partial');
    const dayAgo = (Date.now() - 25 * 60 * 60 * 1000) / 1000;
    utimesSync(leftover, dayAgo, dayAgo);
    const t = await startTestApp({ DATA_DIR: dataDir });
    try {
      await expect.poll(() => readdirSync(staging)).toEqual(['still-arriving']);
    } finally {
      await t.close();
    }
  });
});
