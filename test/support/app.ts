import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/app.js';
import { type Config, loadConfig } from '../../src/config.js';
import { createTestDatabase, type TestDatabase } from './database.js';

export const TEST_SECRET = 'test-secret-that-is-long-enough-for-hs256-0123456789';

export function testConfig(env: Record<string, string> = {}): Config {
  return loadConfig({
    NODE_ENV: 'test',
    JWT_SECRET: TEST_SECRET,
    BCRYPT_ROUNDS: '4',
    LOG_LEVEL: 'silent',
    DATA_DIR: mkdtempSync(join(tmpdir(), 'chatbot-test-')),
    ...env,
  });
}

export interface TestApp {
  app: FastifyInstance;
  config: Config;
  testDb: TestDatabase;
  close(): Promise<void>;
}

/** The real application on a throwaway database, for `app.inject` tests. */
export async function startTestApp(env: Record<string, string> = {}): Promise<TestApp> {
  const testDb = await createTestDatabase();
  const config = testConfig(env);
  const app = await buildApp(config, { database: testDb.database });
  await app.ready();
  return {
    app,
    config,
    testDb,
    async close() {
      await app.close();
      await testDb.drop();
    },
  };
}

let counter = 0;
export function uniqueEmail(prefix = 'user'): string {
  return `${prefix}-${process.pid}-${Date.now()}-${counter++}@example.com`;
}

export interface RegisteredUser {
  id: string;
  email: string;
  password: string;
  token: string;
  auth: { authorization: string };
}

export async function registerUser(app: FastifyInstance, overrides: { email?: string; password?: string; name?: string } = {}): Promise<RegisteredUser> {
  const email = overrides.email ?? uniqueEmail();
  const password = overrides.password ?? 'correct horse battery';
  const response = await app.inject({
    method: 'POST',
    url: '/api/v1/auth/register',
    payload: { email, password, name: overrides.name ?? 'Test User' },
  });
  if (response.statusCode !== 201) throw new Error(`register failed: ${response.statusCode} ${response.body}`);
  const body = response.json() as { token: string; user: { id: string; email: string } };
  return { id: body.user.id, email: body.user.email, password, token: body.token, auth: { authorization: `Bearer ${body.token}` } };
}

/** Asserts the contract's problem+json shape and returns the body. */
export function expectProblem(
  response: { statusCode: number; headers: Record<string, unknown>; json(): unknown },
  status: number,
  code: string,
): Record<string, unknown> {
  const body = response.json() as Record<string, unknown>;
  const failures: string[] = [];
  if (response.statusCode !== status) failures.push(`status ${response.statusCode} != ${status}`);
  if (!String(response.headers['content-type']).startsWith('application/problem+json')) failures.push(`content-type ${String(response.headers['content-type'])}`);
  if (body.code !== code) failures.push(`code ${String(body.code)} != ${code}`);
  if (body.status !== status) failures.push(`body.status ${String(body.status)}`);
  for (const key of ['type', 'title', 'detail', 'instance', 'requestId']) {
    if (typeof body[key] !== 'string') failures.push(`missing ${key}`);
  }
  if (body.requestId !== response.headers['x-request-id']) failures.push('requestId differs from x-request-id');
  if (failures.length) throw new Error(`not the expected problem: ${failures.join('; ')}\n${JSON.stringify(body)}`);
  return body;
}
