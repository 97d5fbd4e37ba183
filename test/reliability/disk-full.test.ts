import { mkdirSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { multipart } from '../support/multipart.js';
import { canMountTmpfs, type ServerProcess, spawnServer, waitUntilServing } from '../support/server-process.js';

// A real server process whose files folder is a 1 MiB file system: an upload that does not fit fills it.
vi.setConfig({ testTimeout: 120_000, hookTimeout: 120_000 });

const ROOM = 1024 * 1024;

let testDb: TestDatabase | undefined;
let server: ServerProcess | undefined;
let filesFolder: string;

beforeAll(async () => {
  if (!canMountTmpfs) return;
  if (process.env.TEST_DATABASE_URL) testDb = await createTestDatabase();
  const dataDir = mkdtempSync(join(tmpdir(), 'chatbot-disk-full-'));
  filesFolder = join(dataDir, 'files');
  mkdirSync(filesFolder);
  server = await spawnServer(
    { DATA_DIR: dataDir, FILE_MAX_BYTES: String(4 * ROOM), ...(testDb ? { DATABASE_URL: testDb.url } : {}) },
    { tmpfs: { path: filesFolder, bytes: ROOM } },
  );
  await waitUntilServing(server);
});

afterAll(async () => {
  if (server) {
    server.child.kill('SIGTERM');
    await server.exited;
  }
  await testDb?.drop();
});

it.skipIf(!canMountTmpfs)('answers an upload that fills the disk 507 INSUFFICIENT_STORAGE, keeps nothing of it, and takes the next one that fits', async () => {
  const api = async (path: string, init: RequestInit = {}, token?: string) => {
    const headers = new Headers(init.headers);
    if (token) headers.set('authorization', `Bearer ${token}`);
    return fetch(`${server!.url}${path}`, { ...init, headers });
  };
  const json = { 'content-type': 'application/json' };
  const registered = await api('/api/v1/auth/register', { method: 'POST', headers: json, body: JSON.stringify({ email: 'full@example.com', password: 'password-1', name: 'Full' }) });
  const { token } = (await registered.json()) as { token: string };
  const project = (await (await api('/api/v1/projects', { method: 'POST', headers: json, body: JSON.stringify({ name: 'Disk' }) }, token)).json()) as { id: string };
  const upload = (bytes: number) => {
    const form = multipart({ filename: 'data.bin', type: 'application/octet-stream', content: Buffer.alloc(bytes, 7) });
    return api(`/api/v1/projects/${project.id}/files`, { method: 'POST', headers: form.headers, body: new Uint8Array(form.payload) }, token);
  };
  // What the server sees in its files folder: its own mount, from outside through its root.
  const seen = () => readdirSync(`/proc/${server!.child.pid}/root${filesFolder}`, { recursive: true, withFileTypes: true }).filter((entry) => entry.isFile());

  const tooLarge = await upload(2 * ROOM);
  expect(tooLarge.status).toBe(507);
  expect(tooLarge.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const problem = (await tooLarge.json()) as Record<string, unknown>;
  expect(problem).toMatchObject({ status: 507, code: 'INSUFFICIENT_STORAGE', requestId: tooLarge.headers.get('x-request-id') });
  expect(problem.detail).toMatch(/no room/);
  expect(seen()).toEqual([]);
  const listed = (await (await api(`/api/v1/projects/${project.id}/files`, {}, token)).json()) as { data: unknown[] };
  expect(listed.data).toEqual([]);

  // The room the failed upload took is free again: a file that fits is stored.
  const fits = await upload(ROOM / 4);
  expect(fits.status).toBe(201);
  expect(seen()).toHaveLength(1);
  expect((await api('/health')).status).toBe(200);
});
