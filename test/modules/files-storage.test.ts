import { mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LocalDiskStorage } from '../../src/modules/files/storage.js';

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
      await expect(storage.put(`project/file-${i}`, failing())).rejects.toThrow(`cut ${i}`);
    });
    await Promise.all(failures);
    expect(readdirSync(join(root, 'tmp'))).toEqual([]);
    expect(readdirSync(root)).toEqual(['tmp']);
  });
});
