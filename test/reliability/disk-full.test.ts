import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it, vi } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { multipart } from '../support/multipart.js';
import { canMountTmpfs, type ServerProcess, spawnServer, waitUntilServing } from '../support/server-process.js';

// Real server processes with a folder of theirs on a small file system (a tmpfs only they see): what is
// written there fills it.
vi.setConfig({ testTimeout: 120_000, hookTimeout: 120_000 });

const MiB = 1024 * 1024;

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A server whose `DATA_DIR/<folder>` (or DATA_DIR itself) is a file system of `bytes`. */
async function serverOnSmallDisk(folder: string | undefined, bytes: number, env: Record<string, string> = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), 'chatbot-disk-full-'));
  const small = folder ? join(dataDir, folder) : dataDir;
  mkdirSync(small, { recursive: true });
  const server: ServerProcess = await spawnServer({ ...env, DATA_DIR: dataDir }, { tmpfs: { path: small, bytes } });
  cleanups.push(async () => {
    server.child.kill('SIGTERM');
    await server.exited;
  });
  await waitUntilServing(server);
  const api = (path: string, init: RequestInit = {}, token?: string) => {
    const headers = new Headers(init.headers);
    if (token) headers.set('authorization', `Bearer ${token}`);
    return fetch(`${server.url}${path}`, { ...init, headers });
  };
  const post = (path: string, body: object, token?: string) =>
    api(path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }, token);
  const { token } = (await (await post('/api/v1/auth/register', { email: 'full@example.com', password: 'password-1', name: 'Full' })).json()) as { token: string };
  const project = (await (await post('/api/v1/projects', { name: 'Disk' }, token)).json()) as { id: string };
  // What the server sees in the small folder: its own mount, from outside through its root.
  const seen = () => readdirSync(`/proc/${server.child.pid}/root${small}`, { recursive: true, withFileTypes: true }).filter((entry) => entry.isFile());
  return { api, post, token, project, seen };
}

async function expectNoRoom(response: Response): Promise<void> {
  expect(response.status).toBe(507);
  expect(response.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const problem = (await response.json()) as Record<string, unknown>;
  expect(problem).toMatchObject({ status: 507, code: 'INSUFFICIENT_STORAGE', requestId: response.headers.get('x-request-id') });
  expect(problem.detail).toMatch(/no room/);
}

it.skipIf(!canMountTmpfs)('answers an upload that fills the disk 507 INSUFFICIENT_STORAGE, keeps nothing of it, and takes the next one that fits', async () => {
  const testDb: TestDatabase | undefined = process.env.TEST_DATABASE_URL ? await createTestDatabase() : undefined;
  if (testDb) cleanups.push(() => testDb.drop());
  const { api, token, project, seen } = await serverOnSmallDisk('files', MiB, {
    FILE_MAX_BYTES: String(4 * MiB),
    ...(testDb ? { DATABASE_URL: testDb.url } : {}),
  });
  const upload = (bytes: number) => {
    const form = multipart({ filename: 'data.bin', type: 'application/octet-stream', content: Buffer.alloc(bytes, 7) });
    return api(`/api/v1/projects/${project.id}/files`, { method: 'POST', headers: form.headers, body: new Uint8Array(form.payload) }, token);
  };

  await expectNoRoom(await upload(2 * MiB));
  expect(seen()).toEqual([]);
  const listed = (await (await api(`/api/v1/projects/${project.id}/files`, {}, token)).json()) as { data: unknown[] };
  expect(listed.data).toEqual([]);

  // The room the failed upload took is free again: a file that fits is stored.
  expect((await upload(MiB / 4)).status).toBe(201);
  expect(seen()).toHaveLength(1);
  expect((await api('/health')).status).toBe(200);
});

// The embedded database lives in DATA_DIR; on PostgreSQL the database is elsewhere, on no small disk.
it.skipIf(!canMountTmpfs || Boolean(process.env.TEST_DATABASE_URL))(
  'answers a write the embedded database has no room for 507 INSUFFICIENT_STORAGE, and goes on serving what is stored',
  async () => {
    // The prompts' limit out of the way: the disk, not MAX_PROMPTS_PER_PROJECT, is to refuse one.
    const { api, post, token, project } = await serverOnSmallDisk(undefined, 64 * MiB, { MAX_PROMPTS_PER_PROJECT: '100000' });
    const prompts = `/api/v1/projects/${project.id}/prompts`;
    let stored = 0;
    let refused: Response | undefined;
    // Text that does not compress: each prompt takes its size on disk.
    while (!refused && stored < 1000) {
      const response = await post(prompts, { title: `Prompt ${stored}`, content: randomBytes(75_000).toString('base64') }, token);
      if (response.status === 201) stored++;
      else refused = response;
    }
    expect(refused, 'the disk never filled').toBeDefined();
    await expectNoRoom(refused!);

    const read = (await (await api(`/api/v1/projects/${project.id}`, {}, token)).json()) as { counts: { prompts: number } };
    expect(read.counts.prompts).toBe(stored);
    const health = await api('/health');
    expect(health.status).toBe(200);
    // A write that needs no new room still goes through.
    expect((await api(`/api/v1/projects/${project.id}`, { method: 'PATCH', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'Full' }) }, token)).status).toBe(200);
  },
);
