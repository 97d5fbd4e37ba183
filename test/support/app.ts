import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { v7 as uuidv7 } from 'uuid';
import { buildApp } from '../../src/app.js';
import { type Config, loadConfig } from '../../src/config.js';
import type { Db } from '../../src/db/database.js';
import { messages } from '../../src/db/schema.js';
import type { ProjectDto } from '../../src/modules/projects/schemas.js';
import type { PromptDto } from '../../src/modules/prompts/schemas.js';
import { createTestDatabase, type TestDatabase } from './database.js';
import { FakeUpstream } from './fake-upstream.js';

export const TEST_SECRET = 'test-secret-that-is-long-enough-for-hs256-0123456789';

export function testConfig(env: Record<string, string> = {}): Config {
  return loadConfig({
    NODE_ENV: 'test',
    JWT_SECRET: TEST_SECRET,
    BCRYPT_ROUNDS: '4',
    LOG_LEVEL: 'silent',
    DATA_DIR: mkdtempSync(join(tmpdir(), 'chatbot-test-')),
    // Suites register and sign in many users from one address, and load a shared machine on purpose
    // (embedded PGlite runs on the event loop): rate limits and load shedding have their own tests.
    RATE_LIMIT_LOGIN: '1000000',
    RATE_LIMIT_REGISTER: '1000000',
    RATE_LIMIT_CHAT: '1000000',
    RATE_LIMIT_API: '1000000',
    MAX_EVENT_LOOP_DELAY_MS: '0',
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
  const config = testConfig(env);
  const testDb = await createTestDatabase();
  let app: FastifyInstance;
  try {
    app = await buildApp(config, { database: testDb.database });
    await app.ready();
  } catch (error) {
    // An app that cannot start leaves no test to close it: its database would stay on the server for good.
    await testDb.drop();
    throw error;
  }
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

export interface TestAppWithUpstream extends TestApp {
  fake: FakeUpstream;
}

/** The app with its default provider at a fake upstream of its own (AI_BASE_URL); close() stops both. */
export async function startTestAppWithUpstream(env: Record<string, string> = {}): Promise<TestAppWithUpstream> {
  const fake = await FakeUpstream.start();
  const t = await startTestApp({ AI_BASE_URL: fake.url, ...env });
  return {
    ...t,
    fake,
    async close() {
      await t.close();
      await fake.close();
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

/** Changes the user's password, which revokes every token issued to them before: `user.auth` no longer lets them in. */
export async function revokeTokens(app: FastifyInstance, user: RegisteredUser): Promise<void> {
  const changed = await app.inject({
    method: 'POST',
    url: '/api/v1/auth/password',
    headers: user.auth,
    payload: { currentPassword: user.password, newPassword: 'another-password-1' },
  });
  if (changed.statusCode !== 204) throw new Error(`password change answered ${changed.statusCode}: ${changed.body}`);
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

async function created<T>(response: { statusCode: number; body: string; json(): unknown }, what: string): Promise<T> {
  if (response.statusCode !== 201) throw new Error(`${what} failed: ${response.statusCode} ${response.body}`);
  return response.json() as T;
}

export async function createProject(app: FastifyInstance, user: RegisteredUser, body: Record<string, unknown> = {}): Promise<ProjectDto> {
  const response = await app.inject({ method: 'POST', url: '/api/v1/projects', headers: user.auth, payload: { name: 'Project', ...body } });
  return created(response, 'create project');
}

export async function createPrompt(
  app: FastifyInstance,
  user: RegisteredUser,
  projectId: string,
  body: Record<string, unknown> = {},
): Promise<PromptDto> {
  const response = await app.inject({
    method: 'POST',
    url: `/api/v1/projects/${projectId}/prompts`,
    headers: user.auth,
    payload: { title: 'Prompt', content: 'You are helpful.', ...body },
  });
  return created(response, 'create prompt');
}

/**
 * Writes `count` history rows straight to the database (chat is what writes them in the application),
 * alternating user and assistant; `overrides` apply to every row.
 */
export async function insertMessages(
  db: Db,
  projectId: string,
  count: number,
  overrides: Partial<typeof messages.$inferInsert> = {},
): Promise<(typeof messages.$inferSelect)[]> {
  const rows = Array.from({ length: count }, (_, i) => ({
    id: uuidv7(),
    projectId,
    role: i % 2 === 0 ? ('user' as const) : ('assistant' as const),
    content: `message ${i}`,
    status: 'complete' as const,
    ...overrides,
  }));
  return db.insert(messages).values(rows).returning();
}
