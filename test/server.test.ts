import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createTestDatabase, type TestDatabase } from './support/database.js';
import { spawnServer, waitUntilServing } from './support/server-process.js';

// Each test starts real server processes (tsx compiles, PGlite boots): slow on a loaded machine.
vi.setConfig({ testTimeout: 120_000 });

describe('the server process', () => {
  it('starts on embedded defaults with no database and no provider key, and keeps a second process off its folder', async () => {
    const server = await spawnServer({});
    try {
      await waitUntilServing(server);
      const health = await fetch(`${server.url}/health`);
      expect(health.status).toBe(200);
      expect(await health.json()).toEqual({ status: 'ok', checks: { database: 'ok' } });

      const second = await spawnServer({ DATA_DIR: server.dataDir });
      expect(await second.exited).toBe(1);
      expect(second.output().trim()).toMatch(/^The embedded database is in use by process \d+[^\n]+$/);
      expect((await fetch(`${server.url}/health`)).status).toBe(200);
    } finally {
      server.child.kill('SIGTERM');
      expect(await server.exited).toBe(0);
    }
  });

  it('refuses a bad configuration with one line naming the variable', async () => {
    const server = await spawnServer({ BCRYPT_ROUNDS: 'many' });
    expect(await server.exited).toBe(1);
    expect(server.output().trim()).toMatch(/^Invalid configuration: BCRYPT_ROUNDS [^\n]+$/);
  });

  it('refuses to start in production without a JWT secret', async () => {
    const server = await spawnServer({ NODE_ENV: 'production' });
    expect(await server.exited).toBe(1);
    expect(server.output().trim()).toMatch(/^Invalid configuration: JWT_SECRET is required[^\n]+$/);
  });
});

describe('graceful shutdown', () => {
  let testDb: TestDatabase | undefined;
  beforeAll(async () => {
    // On PostgreSQL the server gets its own throwaway database; on the embedded default, its own folder.
    if (process.env.TEST_DATABASE_URL) testDb = await createTestDatabase();
  });
  afterAll(() => testDb?.drop());

  it('finishes a request in flight on SIGTERM, refuses new connections, closes the database and exits 0', async () => {
    // Cost 13 makes registration take a few hundred milliseconds: long enough to be in flight.
    const server = await spawnServer({ BCRYPT_ROUNDS: '13', ...(testDb?.url ? { DATABASE_URL: testDb.url } : {}) });
    await waitUntilServing(server);
    const inFlight = fetch(`${server.url}/api/v1/auth/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email: 'inflight@example.com', password: 'password-1', name: 'In flight' }),
    });
    await new Promise((resolve) => setTimeout(resolve, 80));
    server.child.kill('SIGTERM');

    const response = await inFlight;
    expect(response.status).toBe(201);
    expect((await response.json()).user.email).toBe('inflight@example.com');
    expect(await server.exited).toBe(0);
    await expect(fetch(`${server.url}/health/live`)).rejects.toThrow();

    // The acknowledged write is there: a new server on the same data logs the user in.
    const again = await spawnServer({
      BCRYPT_ROUNDS: '4',
      DATA_DIR: server.dataDir,
      ...(testDb?.url ? { DATABASE_URL: testDb.url } : {}),
    });
    try {
      await waitUntilServing(again);
      const login = await fetch(`${again.url}/api/v1/auth/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ email: 'inflight@example.com', password: 'password-1' }),
      });
      expect(login.status).toBe(200);
    } finally {
      again.child.kill('SIGTERM');
      expect(await again.exited).toBe(0);
    }
  });
});
