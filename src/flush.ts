import { open } from 'node:fs/promises';

/** fsync: the data of a file, or a folder's entries, reach the disk before anything relies on them. */
export async function flush(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
