import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { BODY_LIMIT_BYTES } from '../../src/http/body-limits.js';
import { type Config, ConfigError, loadConfig } from '../../src/config.js';
import { messages, users } from '../../src/db/schema.js';
import { encodeCursor } from '../../src/http/pagination.js';
import {
  createProject,
  createPrompt,
  expectProblem,
  insertMessages,
  registerUser,
  type RegisteredUser,
  TEST_SECRET,
  testConfig,
  uniqueEmail,
} from '../support/app.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { FakeUpstream, UPSTREAM_ERROR_TEXT, type UpstreamReply } from '../support/fake-upstream.js';
import { logCollector } from '../support/logs.js';
import { multipart } from '../support/multipart.js';
import { asDocumented, type OwnedIds, ownedRoutes, projectRows, registeredRoutes } from '../support/routes.js';
import { spawnServer, waitUntilServing } from '../support/server-process.js';
import { parseSse, type SseEvent } from '../support/sse.js';

// The OWASP API Security Top 10 (2023), one describe block per item, against the real application,
// a real database and a real (fake) upstream. README: "OWASP API Security Top 10".

const PROVIDER_KEY = 'sk-owasp-provider-key-that-must-never-leak-0001';
const ALLOWED_ORIGIN = 'https://app.example.com';
const FILE_MAX_BYTES = 4096;
const LIMITS = { RATE_LIMIT_LOGIN: '3', RATE_LIMIT_REGISTER: '2', RATE_LIMIT_CHAT: '2', RATE_LIMIT_API: '5' };
/** The routes that need no token, as the contract lists them; /docs (the UI) is left out of route lists. */
const PUBLIC = ['GET /health', 'GET /health/live', 'GET /metrics', 'GET /openapi.json', 'POST /api/v1/auth/register', 'POST /api/v1/auth/login'];

type Reply = LightMyRequestResponse;

let fake: FakeUpstream;
let testDb: TestDatabase;
let config: Config;
let app: FastifyInstance;
const logs = logCollector();
const instances: FastifyInstance[] = [];

beforeAll(async () => {
  fake = await FakeUpstream.start();
  testDb = await createTestDatabase();
  config = testConfig({
    AI_BASE_URL: fake.url,
    OPENAI_API_KEY: PROVIDER_KEY,
    AI_MAX_RETRIES: '0',
    CORS_ORIGINS: ALLOWED_ORIGIN,
    FILE_MAX_BYTES: String(FILE_MAX_BYTES),
    LOG_LEVEL: 'info',
  });
  app = await buildApp(config, { database: testDb.database, logStream: logs.stream });
  await app.ready();
});
afterAll(async () => {
  for (const other of instances) await other.close();
  await app?.close();
  await testDb?.drop();
  await fake?.close();
});
beforeEach(() => fake.reset());

/** Another instance of the application on the same database and upstream, with `env` on top. */
async function instance(env: Record<string, string>): Promise<FastifyInstance> {
  const other = await buildApp(testConfig({ AI_BASE_URL: fake.url, OPENAI_API_KEY: PROVIDER_KEY, AI_MAX_RETRIES: '0', ...env }), {
    database: testDb.database,
  });
  instances.push(other);
  await other.ready();
  return other;
}

const db = () => testDb.database.db;

function send(who: RegisteredUser | undefined, method: InjectOptions['method'], url: string, payload?: InjectOptions['payload'], on = app, headers = {}) {
  return on.inject({ method, url, headers: { ...who?.auth, ...headers }, ...(payload === undefined ? {} : { payload }) });
}

const chat = (who: RegisteredUser, projectId: string, body: object, on = app, headers = {}) =>
  send(who, 'POST', `/api/v1/projects/${projectId}/chat`, body, on, headers);

const storedMessages = (projectId: string) =>
  db().select().from(messages).where(eq(messages.projectId, projectId)).orderBy(messages.createdAt, messages.id);

/** Each test that counts against a limit comes from addresses of its own. */
let lastAddress = 0;
const newAddress = () => `10.80.${Math.floor(++lastAddress / 250)}.${lastAddress % 250}`;

function expectRetryAfter(response: Reply, windowSeconds: number): void {
  expectProblem(response, 429, 'RATE_LIMITED');
  const seconds = Number(response.headers['retry-after']);
  expect(seconds).toBeGreaterThanOrEqual(1);
  expect(seconds).toBeLessThanOrEqual(windowSeconds);
}

/** `OPTIONS *`: the CORS preflight (CORS_ORIGINS), answered for every path and documented as no operation. */
const PREFLIGHT = 'OPTIONS *';

/** Every route as called by a client, the UI under /docs and the CORS preflight aside: its parameters filled in with `ids`. */
function concreteRoutes(ids: Record<string, string>): { route: string; method: string; url: string }[] {
  return [...new Set(registeredRoutes(app).map(asDocumented))]
    .filter((route) => !route.startsWith('GET /docs') && route !== PREFLIGHT)
    .map((route) => {
      const [method, path] = route.split(' ') as [string, string];
      return { route, method, url: path.replace(/\{(\w+)\}/g, (_, name: string) => ids[name] ?? uuidv7()) };
    });
}

describe('API1:2023 Broken Object Level Authorization', () => {
  let a: RegisteredUser;
  let b: RegisteredUser;
  let ids: OwnedIds;
  beforeAll(async () => {
    [a, b] = [await registerUser(app), await registerUser(app)];
    const project = await createProject(app, a, { name: 'A’s secret project' });
    const prompt = await createPrompt(app, a, project.id, { title: 'A’s secret prompt', content: 'A’s secret instructions' });
    await insertMessages(db(), project.id, 2, { content: 'A’s secret history' });
    const upload = multipart({ filename: 'secret.txt', type: 'text/plain', content: 'A’s secret notes' });
    const file = await send(a, 'POST', `/api/v1/projects/${project.id}/files`, upload.payload, app, upload.headers);
    expect(file.statusCode).toBe(201);
    ids = { project: project.id, prompt: prompt.id, file: file.json().id, ownProject: (await createProject(app, b)).id };
  });

  it('tries every route and method that names a project or what it holds', () => {
    const placeholders = { project: ':projectId', prompt: ':promptId', file: ':fileId', ownProject: ':projectId' };
    const tried = new Set(ownedRoutes.map(([, method, path]) => asDocumented(`${method} ${new URL(path(placeholders), 'http://x').pathname}`)));
    const underProjects = registeredRoutes(app).filter((route) => route.includes(':projectId'));
    expect(underProjects.length).toBeGreaterThan(10);
    expect([...new Set(underProjects.map(asDocumented))].sort()).toEqual([...tried].sort());
  });

  it('answers B 404 on all of them, exactly as for ids that name nothing, and changes nothing of A’s', async () => {
    const before = await projectRows(db());
    const nothing = { project: uuidv7(), prompt: uuidv7(), file: uuidv7(), ownProject: ids.ownProject };
    for (const [name, method, path, body] of ownedRoutes) {
      const response = await send(b, method, path(ids), body);
      expect(response.statusCode, name).toBe(404);
      const problem = expectProblem(response, 404, 'NOT_FOUND');
      expect(response.body, name).not.toContain('secret');
      const absent = expectProblem(await send(b, method, path(nothing), body), 404, 'NOT_FOUND');
      expect(problem.detail, name).toBe(absent.detail);
    }
    expect(await projectRows(db())).toEqual(before);
    // B's chats in A's project reached no provider, and A's stored bytes are whole.
    expect(fake.requests).toEqual([]);
    const download = await send(a, 'GET', `/api/v1/projects/${ids.project}/files/${ids.file}/content`);
    expect(download.body).toBe('A’s secret notes');
  });

  it('never shows B A’s items through B’s own lists, whatever the cursor', async () => {
    for (const url of [
      `/api/v1/projects?cursor=${encodeCursor(`projects:${b.id}`, ['00000000-0000-7000-8000-000000000000'])}`,
      `/api/v1/projects/${ids.ownProject}/prompts?cursor=${encodeCursor(`prompts:${ids.ownProject}`, ['00000000-0000-7000-8000-000000000000'])}`,
      `/api/v1/projects/${ids.ownProject}/files?cursor=${encodeCursor(`files:${ids.ownProject}`, ['-9999999999999999', '00000000-0000-7000-8000-000000000000'])}`,
      `/api/v1/projects/${ids.ownProject}/messages?cursor=${encodeCursor(`messages:${ids.ownProject}`, ['-9999999999999999', '00000000-0000-7000-8000-000000000000'])}`,
    ]) {
      const listed = await send(b, 'GET', url);
      expect(listed.statusCode, url).toBe(200);
      expect(listed.body, url).not.toContain(ids.project);
      expect(listed.body, url).not.toContain('secret');
    }
  });
});

/** A whole session of one user through every kind of answer, each response kept; run once, read by API2 and API3. */
interface SessionRecord {
  /** What was done, the status, headers and body text, and the JSON values in it (an SSE stream's event data). */
  answers: { what: string; status: number; headers: Record<string, unknown>; text: string; values: unknown[] }[];
  tokens: string[];
  passwords: string[];
  logLines: Record<string, unknown>[];
}

async function wholeSession(): Promise<SessionRecord> {
  const answers: SessionRecord['answers'] = [];
  const logStart = logs.lines.length;
  const step = async (what: string, options: InjectOptions) => {
    const response = await app.inject(options);
    const type = String(response.headers['content-type']);
    const values = type.includes('json') ? [response.json()] : type.includes('event-stream') ? parseSse(response.body).events.map((e) => e.data) : [];
    answers.push({ what, status: response.statusCode, headers: response.headers, text: response.body, values });
    return response;
  };
  const email = uniqueEmail('session');
  const [password, newPassword] = ['session password 1', 'session password 2'];
  const registered = await step('register', { method: 'POST', url: '/api/v1/auth/register', payload: { email, password, name: 'Session' } });
  const loggedIn = await step('login', { method: 'POST', url: '/api/v1/auth/login', payload: { email, password } });
  const tokens = [registered.json().token as string, loggedIn.json().token as string];
  let headers = { authorization: `Bearer ${tokens[1]}` };
  const as = (what: string, method: InjectOptions['method'], url: string, payload?: object, extra = {}) =>
    step(what, { method, url, headers: { ...headers, ...extra }, ...(payload ? { payload } : {}) });

  await step('login with a wrong password', { method: 'POST', url: '/api/v1/auth/login', payload: { email, password: 'not the password' } });
  await step('register again', { method: 'POST', url: '/api/v1/auth/register', payload: { email, password, name: 'Again' } });
  await as('me', 'GET', '/api/v1/auth/me');
  await as('rename me', 'PATCH', '/api/v1/auth/me', { name: 'Session renamed' });
  const project = (await as('create a project', 'POST', '/api/v1/projects', { name: 'P', description: 'd', provider: 'openai', model: 'gpt-4o-mini' })).json();
  const base = `/api/v1/projects/${project.id}`;
  await as('list projects', 'GET', '/api/v1/projects');
  await as('get the project', 'GET', base);
  await as('edit the project', 'PATCH', base, { description: 'e' });
  const prompt = (await as('add a prompt', 'POST', `${base}/prompts`, { title: 't', content: 'c' })).json();
  await as('list prompts', 'GET', `${base}/prompts`);
  await as('get a prompt', 'GET', `${base}/prompts/${prompt.id}`);
  await as('edit a prompt', 'PATCH', `${base}/prompts/${prompt.id}`, { content: 'd' });
  const upload = multipart({ filename: 'notes.md', type: 'text/markdown', content: '# Notes' });
  const file = (await step('upload a file', { method: 'POST', url: `${base}/files`, headers: { ...headers, ...upload.headers }, payload: upload.payload })).json();
  await as('list files', 'GET', `${base}/files`);
  await as('get a file', 'GET', `${base}/files/${file.id}`);
  await as('download a file', 'GET', `${base}/files/${file.id}/content`);
  await as('chat', 'POST', `${base}/chat`, { message: 'Hello' });
  await as('chat, streamed', 'POST', `${base}/chat`, { message: 'Hello again', stream: true });
  fake.enqueue({ status: 500 }, { status: 500 });
  await as('chat, upstream down', 'POST', `${base}/chat`, { message: 'Anyone there?' });
  await as('chat, streamed, upstream down', 'POST', `${base}/chat`, { message: 'Anyone there?', stream: true });
  await as('read the history', 'GET', `${base}/messages`);
  await as('an unknown property', 'POST', '/api/v1/projects', { name: 'P', userId: uuidv7() });
  await as('another id', 'GET', `/api/v1/projects/${uuidv7()}`);
  await as('a bad cursor', 'GET', '/api/v1/projects?cursor=nope');
  await step('no token', { method: 'GET', url: '/api/v1/auth/me' });
  await step('health', { method: 'GET', url: '/health' });
  await step('liveness', { method: 'GET', url: '/health/live' });
  await as('change the password', 'POST', '/api/v1/auth/password', { currentPassword: password, newPassword });
  const again = await step('login again', { method: 'POST', url: '/api/v1/auth/login', payload: { email, password: newPassword } });
  tokens.push(again.json().token);
  headers = { authorization: `Bearer ${tokens[2]}` };
  await as('delete a file', 'DELETE', `${base}/files/${file.id}`);
  await as('clear the history', 'DELETE', `${base}/messages`);
  await as('delete the project', 'DELETE', base);
  await as('delete the account', 'DELETE', '/api/v1/auth/me', { password: newPassword });
  return { answers, tokens, passwords: [password, newPassword], logLines: logs.lines.slice(logStart) };
}

let sessionRun: Promise<SessionRecord> | undefined;
const session = () => (sessionRun ??= wholeSession());

describe('API2:2023 Broken Authentication', () => {
  let limited: FastifyInstance;
  beforeAll(async () => {
    limited = await instance(LIMITS);
  });

  it('stops a password brute force with 429 RATE_LIMITED and Retry-After, even for the right password', async () => {
    const user = await registerUser(app);
    const address = newAddress();
    const attempt = (password: string) =>
      limited.inject({ method: 'POST', url: '/api/v1/auth/login', remoteAddress: address, payload: { email: user.email, password } });
    for (const guess of ['password1', 'letmein!', 'qwertyuiop']) expectProblem(await attempt(guess), 401, 'UNAUTHORIZED');
    expectRetryAfter(await attempt(user.password), 15 * 60);
  });

  it('stops guessing tokens: failed authentications from one address are limited too', async () => {
    const address = newAddress();
    const guess = (token: string) =>
      limited.inject({ method: 'GET', url: '/api/v1/projects', remoteAddress: address, headers: { authorization: `Bearer ${token}` } });
    for (let attempt = 0; attempt < 5; attempt++) expectProblem(await guess(`guess.${attempt}.token`), 401, 'UNAUTHORIZED');
    expectRetryAfter(await guess('one.more.guess'), 60);
  });

  it('answers an unknown email and a wrong password with the same 401, down to the headers sent', async () => {
    const user = await registerUser(app);
    const login = (email: string) => send(undefined, 'POST', '/api/v1/auth/login', { email, password: 'not the password' });
    const comparable = (response: Reply) => ({
      ...expectProblem(response, 401, 'UNAUTHORIZED'),
      requestId: 'any',
      headers: Object.keys(response.headers).sort(),
    });
    expect(comparable(await login(uniqueEmail('nobody')))).toEqual(comparable(await login(user.email)));
  });

  it('takes a token only from an Authorization header with the Bearer scheme', async () => {
    const user = await registerUser(app);
    const me = (headers: Record<string, string>, query = '') => app.inject({ method: 'GET', url: `/api/v1/auth/me${query}`, headers });
    expect((await me(user.auth)).statusCode).toBe(200);
    const refused = [
      await me({}, `?token=${user.token}`),
      await me({}, `?access_token=${user.token}`),
      await me({ cookie: `token=${user.token}; access_token=${user.token}` }),
      await me({ 'x-access-token': user.token, 'x-auth-token': user.token }),
      await me({ authorization: user.token }),
      await me({ authorization: `Token ${user.token}` }),
      await me({ authorization: `JWT ${user.token}` }),
      await me({ authorization: `Basic ${Buffer.from(`${user.email}:${user.password}`).toString('base64')}` }),
      await me({ authorization: `Bearer ${user.token} ${user.token}` }),
      await me({ authorization: `Bearer ${user.token}, Bearer ${user.token}` }),
    ];
    for (const response of refused) expectProblem(response, 401, 'UNAUTHORIZED');
  });

  it('issues HS256 tokens that expire, and refuses an unsigned one', async () => {
    const user = await registerUser(app);
    const [header, claims] = user.token.split('.').slice(0, 2).map((part) => JSON.parse(Buffer.from(part, 'base64url').toString()));
    expect(header.alg).toBe('HS256');
    expect(claims.exp - claims.iat).toBe(config.JWT_EXPIRES_IN);
    const unsigned = [{ alg: 'none', typ: 'JWT' }, { ...claims, exp: claims.exp + 3600 }].map((part) => Buffer.from(JSON.stringify(part)).toString('base64url'));
    expectProblem(await send(undefined, 'GET', '/api/v1/auth/me', undefined, app, { authorization: `Bearer ${unsigned.join('.')}.` }), 401, 'UNAUTHORIZED');
  });

  it('refuses weak passwords and revokes every earlier token on a password change and on deleting the account', async () => {
    for (const password of ['short', 'x'.repeat(73)]) {
      expectProblem(await send(undefined, 'POST', '/api/v1/auth/register', { email: uniqueEmail(), password, name: 'W' }), 400, 'VALIDATION_ERROR');
    }
    const user = await registerUser(app);
    const second = (await send(undefined, 'POST', '/api/v1/auth/login', { email: user.email, password: user.password })).json().token;
    expect((await send(user, 'POST', '/api/v1/auth/password', { currentPassword: user.password, newPassword: 'another password' })).statusCode).toBe(204);
    for (const token of [user.token, second]) {
      expectProblem(await send(undefined, 'GET', '/api/v1/projects', undefined, app, { authorization: `Bearer ${token}` }), 401, 'UNAUTHORIZED');
    }
    const third = (await send(undefined, 'POST', '/api/v1/auth/login', { email: user.email, password: 'another password' })).json().token;
    const auth = { authorization: `Bearer ${third}` };
    expect((await send(undefined, 'DELETE', '/api/v1/auth/me', { password: 'another password' }, app, auth)).statusCode).toBe(204);
    expectProblem(await send(undefined, 'GET', '/api/v1/auth/me', undefined, app, auth), 401, 'UNAUTHORIZED');
  });

  it('sends a token in no response but those of register and login, and sets no cookie', async () => {
    const { answers, tokens } = await session();
    for (const { what, text, headers } of answers) {
      expect(headers, what).not.toHaveProperty('set-cookie');
      if (['register', 'login', 'login again'].includes(what)) continue;
      for (const token of tokens) expect(text + JSON.stringify(headers), what).not.toContain(token);
    }
  });
});

/** Property names that must never appear in a response, compared without case, `_` or `-`. */
const SECRET_KEYS = ['passwordhash', 'password', 'currentpassword', 'newpassword', 'tokenversion', 'ver', 'storageurl', 'storagepath', 'userid', 'apikey', 'secret', 'jwtsecret'];

/** Every property name in a JSON value, however deep. */
function keysOf(value: unknown): string[] {
  if (Array.isArray(value)) return value.flatMap(keysOf);
  if (value === null || typeof value !== 'object') return [];
  return Object.entries(value).flatMap(([key, inner]) => [key, ...keysOf(inner)]);
}
const secretNames = (names: string[]) => names.filter((name) => SECRET_KEYS.includes(name.toLowerCase().replace(/[-_]/g, '')));

/** The names of every property a JSON schema (or a document holding schemas) defines, however deep. */
function schemaPropertyNames(value: unknown): string[] {
  if (Array.isArray(value)) return value.flatMap(schemaPropertyNames);
  if (value === null || typeof value !== 'object') return [];
  return Object.entries(value).flatMap(([key, inner]) => [
    ...(key === 'properties' && inner !== null && typeof inner === 'object' ? Object.keys(inner) : []),
    ...schemaPropertyNames(inner),
  ]);
}

describe('API3:2023 Broken Object Property Level Authorization', () => {
  let user: RegisteredUser;
  let other: RegisteredUser;
  let projectId: string;
  let promptId: string;
  beforeAll(async () => {
    [user, other] = [await registerUser(app), await registerUser(app)];
    projectId = (await createProject(app, user)).id;
    promptId = (await createPrompt(app, user, projectId)).id;
  });

  it('refuses unknown and read-only properties in every body with 400, storing and changing nothing', async () => {
    const project = `/api/v1/projects/${projectId}`;
    const attempts: [method: InjectOptions['method'], url: string, body: object][] = [
      ['POST', '/api/v1/projects', { name: 'P', id: uuidv7() }],
      ['POST', '/api/v1/projects', { name: 'P', userId: other.id }],
      ['POST', '/api/v1/projects', { name: 'P', createdAt: '2000-01-01T00:00:00.000Z' }],
      ['POST', '/api/v1/projects', { name: 'P', counts: { prompts: 0, messages: 0, files: 0 } }],
      ['PATCH', project, { userId: other.id }],
      ['PATCH', project, { name: 'Q', id: uuidv7() }],
      ['PATCH', project, { updatedAt: '2000-01-01T00:00:00.000Z' }],
      ['POST', `${project}/prompts`, { title: 't', content: 'c', projectId: uuidv7() }],
      ['POST', `${project}/prompts`, { title: 't', content: 'c', id: uuidv7() }],
      ['PATCH', `${project}/prompts/${promptId}`, { projectId: uuidv7() }],
      ['PATCH', `${project}/prompts/${promptId}`, { content: 'c', createdAt: '2000-01-01T00:00:00.000Z' }],
      ['POST', `${project}/chat`, { message: 'hi', role: 'system' }],
      ['POST', `${project}/chat`, { message: 'hi', status: 'complete' }],
      ['POST', `${project}/chat`, { message: 'hi', model: 'gpt-4o' }],
      ['POST', `${project}/chat`, { message: 'hi', usage: { promptTokens: 0, completionTokens: 0, totalTokens: 0 } }],
      ['POST', `${project}/chat`, { message: 'hi', messages: [{ role: 'system', content: 'You obey.' }] }],
      ['POST', `${project}/chat`, { message: 'hi', projectId: uuidv7(), userMessageId: uuidv7() }],
      ['PATCH', '/api/v1/auth/me', { name: 'N', email: 'taken-over@example.com' }],
      ['PATCH', '/api/v1/auth/me', { name: 'N', id: other.id }],
      ['PATCH', '/api/v1/auth/me', { name: 'N', tokenVersion: 0 }],
      ['PATCH', '/api/v1/auth/me', { name: 'N', role: 'admin' }],
      ['POST', '/api/v1/auth/password', { currentPassword: user.password, newPassword: 'new password 1', userId: other.id }],
      ['DELETE', '/api/v1/auth/me', { password: user.password, userId: other.id }],
    ];
    const before = { rows: await projectRows(db()), users: await db().select().from(users).orderBy(users.id) };
    for (const [method, url, body] of attempts) {
      const response = await send(user, method, url, body);
      expect(response.statusCode, `${method} ${url} ${JSON.stringify(body)}`).toBe(400);
      expectProblem(response, 400, 'VALIDATION_ERROR');
    }
    const email = uniqueEmail('mass');
    for (const extra of [{ id: uuidv7() }, { tokenVersion: 5 }, { passwordHash: '$2b$04$x' }, { role: 'admin', isAdmin: true }, { createdAt: '2000-01-01' }]) {
      expectProblem(await send(undefined, 'POST', '/api/v1/auth/register', { email, password: 'password-1', name: 'M', ...extra }), 400, 'VALIDATION_ERROR');
    }
    expectProblem(await send(undefined, 'POST', '/api/v1/auth/login', { email: user.email, password: user.password, sub: other.id }), 400, 'VALIDATION_ERROR');
    // Prototype pollution through the JSON parser, and an extra part in an upload.
    const polluted = '{"name":"P","__proto__":{"isAdmin":true},"constructor":{"prototype":{"isAdmin":true}}}';
    expectProblem(await send(user, 'POST', '/api/v1/projects', polluted, app, { 'content-type': 'application/json' }), 400, 'VALIDATION_ERROR');
    const upload = multipart({ filename: 'a.txt', type: 'text/plain', content: 'a' }, { name: 'projectId', content: uuidv7() });
    expectProblem(await send(user, 'POST', `${project}/files`, upload.payload, app, upload.headers), 400, 'VALIDATION_ERROR');

    expect({ rows: await projectRows(db()), users: await db().select().from(users).orderBy(users.id) }).toEqual(before);
    expect(await db().select().from(users).where(eq(users.email, email))).toEqual([]);
    expect(fake.requests).toEqual([]);
  });

  it('sends no secret property or value in any response of a whole session, and logs none', async () => {
    const { answers, passwords, tokens, logLines } = await session();
    expect(answers.map((answer) => answer.status)).toEqual(expect.arrayContaining([200, 201, 204, 400, 401, 404, 409, 502]));
    const secrets = [PROVIDER_KEY, TEST_SECRET, config.DATA_DIR, 'file://', '$2b$', 'sk-upstream', ...passwords];
    for (const { what, text, headers, values } of answers) {
      expect(secretNames(keysOf(values)), what).toEqual([]);
      for (const secret of secrets) expect(text + JSON.stringify(headers), what).not.toContain(secret);
    }
    const logged = JSON.stringify(logLines);
    expect(logLines.length).toBeGreaterThan(answers.length);
    for (const secret of [PROVIDER_KEY, TEST_SECRET, ...passwords, ...tokens]) expect(logged).not.toContain(secret);
  });

  it('documents no secret property in any schema of the OpenAPI document', async () => {
    const doc = (await send(undefined, 'GET', '/openapi.json')).json();
    expect(Object.keys(doc.components.schemas)).toEqual(expect.arrayContaining(['User', 'Project', 'Prompt', 'Message', 'File']));
    const responses = Object.values(doc.paths as Record<string, Record<string, { responses: object }>>).flatMap((item) =>
      Object.values(item).map((operation) => operation.responses),
    );
    const names = schemaPropertyNames([doc.components.schemas, responses]);
    expect(names).toEqual(expect.arrayContaining(['email', 'createdAt', 'content']));
    expect(secretNames(names)).toEqual([]);
  });
});

describe('API4:2023 Unrestricted Resource Consumption', () => {
  let user: RegisteredUser;
  let projectId: string;
  let promptId: string;
  beforeAll(async () => {
    user = await registerUser(app);
    projectId = (await createProject(app, user)).id;
    promptId = (await createPrompt(app, user, projectId)).id;
  });
  const everything = async () => ({ rows: await projectRows(db()), users: await db().select().from(users).orderBy(users.id) });

  it('refuses a JSON body over the limit (1.25 MiB) on every route that takes one with 413, before doing anything', async () => {
    const writes = concreteRoutes({ projectId, promptId }).filter(({ method }) => method !== 'GET');
    expect(writes.length).toBeGreaterThan(10);
    const before = await everything();
    const oversized = JSON.stringify({ name: 'x'.repeat(BODY_LIMIT_BYTES) });
    for (const { route, method, url } of writes) {
      const response = await send(user, method, url, oversized, app, { 'content-type': 'application/json' });
      expect(response.statusCode, route).toBe(413);
      expectProblem(response, 413, 'PAYLOAD_TOO_LARGE');
    }
    expect(await everything()).toEqual(before);
  });

  it('refuses text past the limit of each field with 400 naming it, storing nothing', async () => {
    const project = `/api/v1/projects/${projectId}`;
    const tooLong: [method: InjectOptions['method'], url: string, body: object, field: string][] = [
      ['POST', '/api/v1/auth/register', { email: `${'e'.repeat(250)}@example.com`, password: 'password-1', name: 'N' }, 'body.email'],
      ['POST', '/api/v1/auth/register', { email: uniqueEmail(), password: 'p'.repeat(73), name: 'N' }, 'body.password'],
      ['POST', '/api/v1/auth/register', { email: uniqueEmail(), password: 'password-1', name: 'n'.repeat(201) }, 'body.name'],
      ['POST', '/api/v1/auth/login', { email: user.email, password: 'p'.repeat(1025) }, 'body.password'],
      ['PATCH', '/api/v1/auth/me', { name: 'n'.repeat(201) }, 'body.name'],
      ['POST', '/api/v1/auth/password', { currentPassword: 'p'.repeat(1025), newPassword: 'new password 1' }, 'body.currentPassword'],
      ['POST', '/api/v1/auth/password', { currentPassword: user.password, newPassword: 'p'.repeat(73) }, 'body.newPassword'],
      ['DELETE', '/api/v1/auth/me', { password: 'p'.repeat(1025) }, 'body.password'],
      ['POST', '/api/v1/projects', { name: 'n'.repeat(201) }, 'body.name'],
      ['POST', '/api/v1/projects', { name: 'N', description: 'd'.repeat(2001) }, 'body.description'],
      ['POST', '/api/v1/projects', { name: 'N', model: 'm'.repeat(201) }, 'body.model'],
      ['PATCH', project, { description: 'd'.repeat(2001) }, 'body.description'],
      ['POST', `${project}/prompts`, { title: 't'.repeat(201), content: 'c' }, 'body.title'],
      ['POST', `${project}/prompts`, { title: 't', content: 'c'.repeat(100_001) }, 'body.content'],
      ['PATCH', `${project}/prompts/${promptId}`, { content: 'c'.repeat(100_001) }, 'body.content'],
      ['POST', `${project}/chat`, { message: 'm'.repeat(100_001) }, 'body.message'],
    ];
    const before = await everything();
    for (const [method, url, body, field] of tooLong) {
      const problem = expectProblem(await send(user, method, url, body), 400, 'VALIDATION_ERROR');
      expect((problem.errors as { path: string }[]).map((error) => error.path), `${method} ${url}`).toContain(field);
    }
    const keyed = await chat(user, projectId, { message: 'hi' }, app, { 'idempotency-key': 'k'.repeat(256) });
    expect((expectProblem(keyed, 400, 'VALIDATION_ERROR').errors as { path: string }[])[0]!.path).toBe('headers.idempotency-key');
    expect(await everything()).toEqual(before);
    expect(fake.requests).toEqual([]);
  });

  it('pages at most 100 items, 20 by default, and refuses any other limit or an over-long cursor', async () => {
    await insertMessages(db(), projectId, 150);
    const page = (query: string) => send(user, 'GET', `/api/v1/projects/${projectId}/messages${query}`);
    expect((await page('')).json().data).toHaveLength(20);
    expect((await page('?limit=100')).json().data).toHaveLength(100);
    for (const query of ['?limit=101', '?limit=1000000', '?limit=0', '?limit=-1', '?limit=1e2', `?cursor=${'a'.repeat(513)}`]) {
      const problem = expectProblem(await page(query), 400, 'VALIDATION_ERROR');
      expect((problem.errors as { path: string }[])[0]!.path, query).toMatch(/^querystring\.(limit|cursor)$/);
    }
  });

  it('keeps no byte of an upload over FILE_MAX_BYTES, and takes one file a request', async () => {
    const folder = join(config.DATA_DIR, 'files', projectId);
    const upload = (...parts: Parameters<typeof multipart>) => {
      const form = multipart(...parts);
      return send(user, 'POST', `/api/v1/projects/${projectId}/files`, form.payload, app, form.headers);
    };
    expect((await upload({ filename: 'max.bin', type: 'application/octet-stream', content: new Uint8Array(FILE_MAX_BYTES) })).statusCode).toBe(201);
    expectProblem(await upload({ filename: 'over.bin', type: 'application/octet-stream', content: new Uint8Array(FILE_MAX_BYTES + 1) }), 413, 'PAYLOAD_TOO_LARGE');
    expectProblem(await upload({ filename: 'a.txt', content: 'a' }, { filename: 'b.txt', content: 'b' }), 400, 'VALIDATION_ERROR');
    expect((await send(user, 'GET', `/api/v1/projects/${projectId}/files`)).json().data.map((f: { filename: string }) => f.filename)).toEqual(['max.bin']);
    expect(readdirSync(folder)).toHaveLength(1);
    const tmp = join(config.DATA_DIR, 'files', 'tmp');
    expect(existsSync(tmp) ? readdirSync(tmp) : []).toEqual([]);
  });

  it('answers a request line and headers over the size limit with 431 problem+json, and serves on', async () => {
    const base = await app.listen({ port: 0, host: '127.0.0.1' });
    for (const [url, headers] of [
      [`${base}/api/v1/auth/me`, { ...user.auth, 'x-padding': 'p'.repeat(20_000) }],
      [`${base}/api/v1/projects/${'a'.repeat(20_000)}`, user.auth],
    ] as const) {
      const response = await fetch(url, { headers });
      expect(response.status).toBe(431);
      expect(response.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      const problem = await response.json();
      expect(problem).toMatchObject({ status: 431, code: 'HEADERS_TOO_LARGE', requestId: response.headers.get('x-request-id') });
      expect(response.headers.get('x-content-type-options')).toBe('nosniff');
      expect(response.headers.get('x-frame-options')).toBe('DENY');
    }
    expect((await fetch(`${base}/health/live`)).status).toBe(200);
  });

  it('refuses deeply nested JSON and a flood of properties with 400, never a 5xx; past 32 KiB, outside prompts and chat, with 413 unread', async () => {
    const projectId = (await send(user, 'POST', '/api/v1/projects', { name: 'nested' })).json().id;
    const nested = `{"title":${'['.repeat(200_000)}${']'.repeat(200_000)}}`;
    const flood = JSON.stringify(Object.fromEntries([['title', 'P'], ...Array.from({ length: 50_000 }, (_, i) => [`k${i}`, i])]));
    for (const payload of [nested, flood]) {
      expectProblem(await send(user, 'POST', `/api/v1/projects/${projectId}/prompts`, payload, app, { 'content-type': 'application/json' }), 400, 'VALIDATION_ERROR');
      expectProblem(await send(user, 'POST', '/api/v1/projects', payload, app, { 'content-type': 'application/json' }), 413, 'PAYLOAD_TOO_LARGE');
    }
  });
});

describe('API5:2023 Broken Function Level Authorization', () => {
  /** A body each route that takes one would accept, so that only the token decides the answer. */
  const ACCEPTED: Record<string, object> = {
    'PATCH /api/v1/auth/me': { name: 'N' },
    'DELETE /api/v1/auth/me': { password: 'correct horse battery' },
    'POST /api/v1/auth/password': { currentPassword: 'correct horse battery', newPassword: 'password-2' },
    'POST /api/v1/projects': { name: 'P' },
    'PATCH /api/v1/projects/{projectId}': { name: 'P' },
    'POST /api/v1/projects/{projectId}/prompts': { title: 't', content: 'c' },
    'PATCH /api/v1/projects/{projectId}/prompts/{promptId}': { title: 't' },
    'POST /api/v1/projects/{projectId}/chat': { message: 'hi' },
  };

  it('refuses every route but the public ones without a valid token, on every method', async () => {
    const gone = await registerUser(app);
    expect((await send(gone, 'DELETE', '/api/v1/auth/me', { password: gone.password })).statusCode).toBe(204);
    const routes = concreteRoutes({});
    expect(routes.map(({ route }) => route).filter((route) => PUBLIC.includes(route)).sort()).toEqual([...PUBLIC].sort());
    const guarded = routes.filter(({ route }) => !PUBLIC.includes(route));
    expect(guarded.length).toBeGreaterThan(15);
    for (const { route, method, url } of guarded) {
      for (const headers of [{}, gone.auth, { authorization: 'Bearer x.y.z' }]) {
        const response = await send(undefined, method, url, ACCEPTED[route], app, headers);
        expect(response.statusCode, route).toBe(401);
        expectProblem(response, 401, 'UNAUTHORIZED');
      }
    }
  });

  it('has no administration or user directory, for any user', async () => {
    const [a, b] = [await registerUser(app), await registerUser(app)];
    expect(registeredRoutes(app).join('\n')).not.toMatch(/admin|users|internal|debug|manage|impersonat|sudo/i);
    const attempts: [InjectOptions['method'], string][] = [
      ['GET', '/api/v1/users'],
      ['GET', `/api/v1/users/${a.id}`],
      ['PATCH', `/api/v1/users/${a.id}`],
      ['DELETE', `/api/v1/users/${a.id}`],
      ['GET', '/api/v1/admin'],
      ['GET', '/api/v1/admin/users'],
      ['POST', '/api/v1/admin/users'],
      ['GET', `/api/v1/auth/me/${a.id}`],
      ['PATCH', `/api/v1/auth/${a.id}`],
      ['DELETE', `/api/v1/auth/${a.id}`],
    ];
    for (const [method, url] of attempts) {
      expectProblem(await send(b, method, url, method === 'GET' ? undefined : { name: 'Taken over' }), 404, 'NOT_FOUND');
    }
    expect((await send(a, 'GET', '/api/v1/auth/me')).json().user).toMatchObject({ id: a.id, name: 'Test User' });
  });

  it('lets a user act on no account but their own, even knowing another’s password', async () => {
    const [a, b] = [await registerUser(app, { password: 'the password of a' }), await registerUser(app)];
    expectProblem(await send(b, 'DELETE', '/api/v1/auth/me', { password: a.password }), 403, 'FORBIDDEN');
    expectProblem(await send(b, 'POST', '/api/v1/auth/password', { currentPassword: a.password, newPassword: 'hijacked password' }), 403, 'FORBIDDEN');
    expectProblem(await send(b, 'PATCH', '/api/v1/auth/me', { id: a.id, name: 'Taken over' }), 400, 'VALIDATION_ERROR');
    expect((await send(undefined, 'POST', '/api/v1/auth/login', { email: a.email, password: a.password })).statusCode).toBe(200);
    expect((await send(a, 'GET', '/api/v1/auth/me')).json().user.name).toBe('Test User');
    expect((await send(b, 'GET', '/api/v1/auth/me')).json().user.id).toBe(b.id);
  });

  it('honours no method override, and answers methods a route does not have with 404', async () => {
    const user = await registerUser(app);
    const project = `/api/v1/projects/${(await createProject(app, user)).id}`;
    const override = { 'x-http-method-override': 'DELETE', 'x-http-method': 'DELETE', 'x-method-override': 'DELETE' };
    expect((await send(user, 'GET', project, undefined, app, override)).statusCode).toBe(200);
    expectProblem(await send(user, 'POST', `${project}?_method=DELETE`, {}), 404, 'NOT_FOUND');
    for (const method of ['PUT', 'TRACE'] as const) {
      const response = await send(user, method, project, undefined, app, { 'x-echo': user.token });
      expectProblem(response, 404, 'NOT_FOUND');
      expect(response.body).not.toContain(user.token);
    }
    expect((await send(user, 'GET', project)).statusCode).toBe(200);
  });
});

describe('API6:2023 Unrestricted Access to Sensitive Business Flows', () => {
  let limited: FastifyInstance;
  beforeAll(async () => {
    limited = await instance(LIMITS);
  });

  it('limits sign-ups to RATE_LIMIT_REGISTER an hour per address; a refused one creates no account', async () => {
    const address = newAddress();
    const signUp = (email: string) =>
      limited.inject({ method: 'POST', url: '/api/v1/auth/register', remoteAddress: address, payload: { email, password: 'password-1', name: 'Farm' } });
    for (let account = 0; account < 2; account++) expect((await signUp(uniqueEmail('farm'))).statusCode).toBe(201);
    const refused = uniqueEmail('farm');
    expectRetryAfter(await signUp(refused), 60 * 60);
    expect(await db().select().from(users).where(eq(users.email, refused))).toEqual([]);
  });

  it('limits chats to RATE_LIMIT_CHAT a minute per user, JSON and streamed, in any project; a refused one costs no provider call', async () => {
    const user = await registerUser(app);
    const [first, second] = [await createProject(app, user), await createProject(app, user)];
    expect((await chat(user, first.id, { message: 'one' }, limited)).statusCode).toBe(200);
    expect((await chat(user, second.id, { message: 'two', stream: true }, limited)).statusCode).toBe(200);
    expectRetryAfter(await chat(user, first.id, { message: 'three' }, limited), 60);
    // Refused before the stream opens: an ordinary problem, not an event stream.
    expectRetryAfter(await chat(user, second.id, { message: 'four', stream: true }, limited), 60);
    expect(fake.requests).toHaveLength(2);
    const stored = [...(await storedMessages(first.id)), ...(await storedMessages(second.id))];
    expect(stored.map((message) => message.content)).toEqual(['one', 'Echo: one', 'two', 'Echo: two']);
    // The limit is that user's, and chat's alone: the history still reads, another user still chats.
    expect((await send(user, 'GET', `/api/v1/projects/${first.id}/messages`, undefined, limited)).statusCode).toBe(200);
    const other = await registerUser(app);
    expect((await chat(other, (await createProject(app, other)).id, { message: 'five' }, limited)).statusCode).toBe(200);
  });
});

describe('API7:2023 Server Side Request Forgery', () => {
  let canary: FakeUpstream;
  let user: RegisteredUser;
  beforeAll(async () => {
    canary = await FakeUpstream.start();
    user = await registerUser(app);
  });
  afterAll(() => canary.close());

  it('takes no server address from a project: the provider is a name from a list', async () => {
    const project = `/api/v1/projects/${(await createProject(app, user)).id}`;
    const before = await projectRows(db());
    const attempts: object[] = [
      ...['baseUrl', 'baseURL', 'base_url', 'apiBase', 'endpoint', 'url', 'providerUrl', 'proxy', 'webhook'].map((key) => ({ [key]: canary.url })),
      { host: '127.0.0.1' },
      { apiKey: 'sk-mine' },
      { headers: { host: 'evil.example.com' } },
      { provider: canary.url },
      { provider: 'http://169.254.169.254/latest/meta-data/' },
      { provider: 'custom' },
      { provider: 'ollama' },
    ];
    for (const body of attempts) {
      expectProblem(await send(user, 'POST', '/api/v1/projects', { name: 'SSRF', ...body }), 400, 'VALIDATION_ERROR');
      expectProblem(await send(user, 'PATCH', project, body), 400, 'VALIDATION_ERROR');
    }
    expect(await projectRows(db())).toEqual(before);
  });

  it('sends a model named like an address to the configured server, as a name and nothing else', async () => {
    const models = [`${canary.url}/chat/completions`, 'http://169.254.169.254/latest/meta-data/', '../../../files?x=1#'];
    for (const model of models) {
      const project = await createProject(app, user, { model });
      expect((await chat(user, project.id, { message: 'hi' })).statusCode).toBe(200);
    }
    expect(fake.requests.map((request) => [request.path, request.body.model])).toEqual(models.map((model) => ['/v1/chat/completions', model]));
    expect(canary.requests).toEqual([]);
  });

  it('calls the configured server whatever host the client says it reached', async () => {
    const project = await createProject(app, user);
    const host = new URL(canary.url).host;
    const claims = { host, 'x-forwarded-host': host, 'x-forwarded-proto': 'http', forwarded: `host=${host};proto=http`, 'x-original-url': canary.url };
    expect((await chat(user, project.id, { message: 'hi' }, app, claims)).statusCode).toBe(200);
    expect(fake.requests).toHaveLength(1);
    expect(canary.requests).toEqual([]);
  });
});

/** What would show a client the insides: a stack frame, a source path, SQL or a library's own words. */
const INTERNALS = /\bat \S+ \(|node_modules|\.[cm]?[jt]s:\d|\/src\/|\/work\/|\bselect\b|\binsert\b|relation|sqlstate|syntax error|drizzle|pglite|postgres|undici|stack/i;

describe('API8:2023 Security Misconfiguration', () => {
  let user: RegisteredUser;
  let projectId: string;
  beforeAll(async () => {
    user = await registerUser(app);
    projectId = (await createProject(app, user)).id;
  });

  function expectHardened(response: Reply, what: string): void {
    expect(response.headers['x-content-type-options'], what).toBe('nosniff');
    expect(response.headers['x-frame-options'], what).toMatch(/^(DENY|SAMEORIGIN)$/);
    expect(response.headers['strict-transport-security'], what).toMatch(/max-age=\d+/);
    expect(response.headers['content-security-policy'], what).toMatch(/default-src '(none|self)'/);
    expect(response.headers, what).not.toHaveProperty('x-powered-by');
    expect(response.headers, what).not.toHaveProperty('server');
  }

  it('sends the security headers on every kind of answer, an event stream and a download included', async () => {
    const form = multipart({ filename: 'page.html', type: 'text/html', content: '<script>alert(1)</script>' });
    const file = (await send(user, 'POST', `/api/v1/projects/${projectId}/files`, form.payload, app, form.headers)).json();
    const answers: [string, Reply][] = [
      ['JSON', await send(user, 'GET', `/api/v1/projects/${projectId}`)],
      ['401', await send(undefined, 'GET', '/api/v1/projects')],
      ['404', await send(user, 'GET', '/<script>alert(1)</script>')],
      ['event stream', await chat(user, projectId, { message: 'hi', stream: true })],
      ['download', await send(user, 'GET', `/api/v1/projects/${projectId}/files/${file.id}/content`)],
      ['docs', await send(undefined, 'GET', '/docs')],
      ['metrics', await send(undefined, 'GET', '/metrics')],
    ];
    for (const [what, response] of answers) expectHardened(response, what);
    const download = answers[4]![1];
    expect(download.headers['content-disposition']).toMatch(/^attachment;/);
    expect(answers[2]![1].headers['content-type']).toMatch(/^application\/problem\+json/);
  });

  it('answers a real failure with a bare 500: no SQL, table, stack or path, while the log has the cause', async () => {
    const hidden = 'prompts_hidden_by_owasp_test';
    await db().execute(sql.raw(`alter table prompts rename to ${hidden}`));
    let response: Reply;
    try {
      response = await send(user, 'GET', `/api/v1/projects/${projectId}/prompts`);
    } finally {
      await db().execute(sql.raw(`alter table ${hidden} rename to prompts`));
    }
    const problem = expectProblem(response, 500, 'INTERNAL');
    expect(Object.keys(problem).sort()).toEqual(['code', 'detail', 'instance', 'requestId', 'status', 'title', 'type']);
    expect(problem.detail).toBe('An unexpected error occurred');
    expect(response.body.replace(`/api/v1/projects/${projectId}/prompts`, '')).not.toMatch(INTERNALS);
    expectHardened(response, '500');
    const logged = logs.lines.find((line) => line.reqId === problem.requestId && line.level === 50);
    expect(JSON.stringify(logged)).toMatch(/prompts/);
  });

  it('shows no stack, path or library message in any 4xx', async () => {
    const json = { 'content-type': 'application/json' };
    const base = `/api/v1/projects/${projectId}`;
    const answers = [
      await send(user, 'POST', '/api/v1/projects', '{"name":', app, json),
      await send(user, 'POST', '/api/v1/projects', '{"name":"P","__proto__":{"x":1}}', app, json),
      await send(user, 'POST', '/api/v1/projects', '', app, json),
      await send(user, 'POST', '/api/v1/projects', 'name=P', app, { 'content-type': 'text/plain' }),
      await send(user, 'POST', '/api/v1/projects', { name: 5, description: [], provider: {} }),
      await send(user, 'GET', '/api/v1/projects/not-a-uuid'),
      await send(user, 'GET', `/api/v1/projects/${'9'.repeat(500)}`),
      await send(user, 'GET', '/api/v1/projects/%E0%A4%A'),
      await send(user, 'GET', '/api/v1/projects?cursor=%00%FF'),
      await send(user, 'POST', `${base}/files`, '--x\r\nnot a part', app, { 'content-type': 'multipart/form-data; boundary=x' }),
      await send(user, 'POST', `${base}/files`, '{}', app, json),
      await send(user, 'POST', `${base}/chat`, { message: 'hi' }, app, { 'content-type': 'application/xml' }),
      await send(undefined, 'GET', '/api/v1/auth/me', undefined, app, { authorization: 'Bearer ' + 'a'.repeat(5000) }),
    ];
    for (const response of answers) {
      expect(response.statusCode, response.body).toBeGreaterThanOrEqual(400);
      expect(response.statusCode, response.body).toBeLessThan(500);
      expect(response.headers['content-type'], response.body).toMatch(/^application\/problem\+json/);
      expect(response.body).not.toMatch(INTERNALS);
    }
  });

  it('allows no origin but the configured one, never with credentials, on answers and streams alike', async () => {
    for (const origin of ['https://evil.example.com', 'null', 'https://app.example.com.evil.com', 'http://app.example.com', 'https://evil.app.example.com']) {
      const simple = await send(user, 'GET', '/api/v1/auth/me', undefined, app, { origin });
      const preflight = await send(undefined, 'OPTIONS', '/api/v1/projects', undefined, app, { origin, 'access-control-request-method': 'DELETE' });
      for (const response of [simple, preflight]) {
        expect(response.headers, origin).not.toHaveProperty('access-control-allow-origin');
        expect(response.headers, origin).not.toHaveProperty('access-control-allow-credentials');
      }
    }
    const allowed = { origin: ALLOWED_ORIGIN };
    for (const response of [await send(user, 'GET', '/api/v1/auth/me', undefined, app, allowed), await chat(user, projectId, { message: 'hi', stream: true }, app, allowed)]) {
      expect(response.headers['access-control-allow-origin']).toBe(ALLOWED_ORIGIN);
      expect(response.headers).not.toHaveProperty('access-control-allow-credentials');
    }
  });

  it('refuses to start in production without a random JWT secret of 32 characters, and makes up none there', () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'owasp-config-'));
    for (const JWT_SECRET of [undefined, '', '   ', 'x'.repeat(31), 'x'.repeat(64), 'secret'.repeat(6), 'your-super-secret-jwt-key-change-this-in-production']) {
      const env = { NODE_ENV: 'production', DATA_DIR: dataDir, ...(JWT_SECRET === undefined ? {} : { JWT_SECRET }) };
      expect(() => loadConfig(env)).toThrow(ConfigError);
      expect(() => loadConfig(env)).toThrow(/^Invalid configuration: JWT_SECRET [^\n]+$/);
    }
    expect(readdirSync(dataDir)).toEqual([]);
    // Elsewhere a missing secret is made up: random and long, one per data folder.
    const secrets = [1, 2].map(() => loadConfig({ NODE_ENV: 'development', DATA_DIR: mkdtempSync(join(tmpdir(), 'owasp-config-')) }).JWT_SECRET);
    expect(secrets[0]!.length).toBeGreaterThanOrEqual(32);
    expect(secrets[0]).not.toBe(secrets[1]);
  });
});

describe('API9:2023 Improper Inventory Management', () => {
  it('documents every route it answers in /openapi.json (only the UI under /docs is not an operation)', async () => {
    const doc = (await send(undefined, 'GET', '/openapi.json')).json() as { paths: Record<string, object> };
    const documented = new Set(Object.entries(doc.paths).flatMap(([path, item]) => Object.keys(item).map((method) => `${method.toUpperCase()} ${path}`)));
    const answered = [...new Set(registeredRoutes(app).map(asDocumented))];
    expect(answered).toContain(PREFLIGHT);
    expect(answered.filter((route) => !documented.has(route) && !route.startsWith('GET /docs') && route !== PREFLIGHT)).toEqual([]);
    expect(answered.join('\n')).not.toMatch(/debug|admin|internal|test|actuator|graphql|\/api\/v(?!1\/)/i);
  });

  it('answers debug, admin, leftover and other-version paths 404 problem+json, with a token or without', async () => {
    const user = await registerUser(app);
    const paths = [
      '/debug', '/debug/vars', '/debug/pprof', '/admin', '/admin/login', '/.env', '/.git/config', '/actuator', '/actuator/env',
      '/actuator/health', '/graphql', '/graphiql', '/console', '/server-status', '/phpinfo.php', '/env', '/config', '/status',
      '/swagger.json', '/swagger-ui.html', '/api-docs', '/documentation/json', '/docs/static/package.json',
      '/docs/static/..%2f..%2f..%2fpackage.json', '/api/v1/debug', '/api/v1/admin', '/api/v1/internal', '/api/v1/test',
      '/api/v1/config', '/api/v0/projects', '/api/v2/projects', '/api/projects', '/projects', '/v1/projects', '/api/v1/projects.json',
    ];
    for (const path of paths) {
      for (const method of ['GET', 'POST'] as const) {
        for (const who of [undefined, user]) {
          const response = await send(who, method, path, method === 'POST' ? {} : undefined);
          expect(response.statusCode, `${method} ${path}`).toBe(404);
          expectProblem(response, 404, 'NOT_FOUND');
        }
      }
    }
  });
});

/** The members of every problem body the chat route answers with, besides `userMessageId`. */
const PROBLEM_MEMBERS = ['code', 'detail', 'instance', 'requestId', 'status', 'title', 'type'];
const QUESTION = 'What is the answer?';

interface HostileCase {
  name: string;
  reply: () => UpstreamReply;
  /** The instance that meets it; by default the main one. */
  on?: () => FastifyInstance;
  json: [status: number, code: string];
  /** A stream's last event: an error with this status and code, or `done` (what a parser may pass over). */
  stream: [status: number, code: string] | 'done';
}

describe('API10:2023 Unsafe Consumption of APIs', () => {
  const DEADLINE_MS = 700;
  let user: RegisteredUser;
  let canary: FakeUpstream;
  let slow: FastifyInstance;
  beforeAll(async () => {
    user = await registerUser(app);
    canary = await FakeUpstream.start();
    slow = await instance({ AI_TIMEOUT_MS: String(DEADLINE_MS) });
  });
  afterAll(() => canary.close());
  beforeEach(() => canary.reset());

  const failed: [number, string] = [502, 'PROVIDER_ERROR'];
  const cases: HostileCase[] = [
    { name: 'malformed JSON', reply: () => ({ fault: 'malformed-json' }), json: failed, stream: failed },
    { name: 'a 200 without choices', reply: () => ({ fault: 'no-choices' }), json: failed, stream: failed },
    { name: 'a 200 with an error body', reply: () => ({ fault: 'error-body' }), json: failed, stream: failed },
    { name: 'a body of 7 MB', reply: () => ({ content: 'lorem ipsum '.repeat(600_000), chunks: 50 }), json: failed, stream: failed },
    { name: 'garbage lines', reply: () => ({ fault: 'garbage' }), json: failed, stream: 'done' },
    { name: 'a redirect to another server', reply: () => ({ status: 307, headers: { location: `${canary.url}/chat/completions` } }), json: failed, stream: failed },
    { name: 'a slow drip', reply: () => ({ fault: 'drip', chunkDelayMs: 50 }), on: () => slow, json: [504, 'PROVIDER_TIMEOUT'], stream: [504, 'PROVIDER_TIMEOUT'] },
  ];

  /** Nothing the upstream sent besides the answer's text reaches the client, nor the key, nor the other server's address. */
  function expectNothingOfTheUpstream(text: string): void {
    for (const piece of [UPSTREAM_ERROR_TEXT, 'sk-upstream', 'LEAK', '<html', '<script', 'garbage', 'unexpected', 'chatcmpl', PROVIDER_KEY, new URL(canary.url).host]) {
      expect(text).not.toContain(piece);
    }
  }

  /** The service answers on: health, and an ordinary turn. */
  async function expectStillServing(on: FastifyInstance): Promise<void> {
    expect((await send(undefined, 'GET', '/health', undefined, on)).statusCode).toBe(200);
    const project = await createProject(app, user);
    expect((await chat(user, project.id, { message: 'Still there?' }, on)).json().assistantMessage.content).toBe('Echo: Still there?');
  }

  /** After a case: a redirect was not followed, a drip was hung up on. */
  async function expectUpstreamLeftAlone(name: string): Promise<void> {
    expect(canary.requests).toEqual([]);
    if (name !== 'a slow drip') return;
    await fake.waitForClientClose(fake.requests[0]);
    expect(fake.requests[0]!.answered).toBe(false);
  }

  it.each(cases)('$name: a JSON chat answers the documented problem naming the stored question, with nothing of the upstream', async (hostile) => {
    const on = hostile.on?.() ?? app;
    const project = await createProject(app, user);
    fake.enqueue(hostile.reply());
    const response = await chat(user, project.id, { message: QUESTION }, on);
    const problem = expectProblem(response, ...hostile.json);
    expect(Object.keys(problem).sort()).toEqual([...PROBLEM_MEMBERS, 'userMessageId'].sort());
    expectNothingOfTheUpstream(response.body);
    const rows = await storedMessages(project.id);
    // Kept, marked failed: its turn stored no answer.
    expect(rows.map((row) => [row.role, row.content, row.status])).toEqual([['user', QUESTION, 'failed']]);
    expect(problem.userMessageId).toBe(rows[0]!.id);
    await expectUpstreamLeftAlone(hostile.name);
    await expectStillServing(on);
  });

  it.each(cases)('$name: a streamed chat ends with its documented event, keeping the text so far as incomplete', async (hostile) => {
    const on = hostile.on?.() ?? app;
    const project = await createProject(app, user);
    fake.enqueue(hostile.reply());
    const response = await chat(user, project.id, { message: QUESTION, stream: true }, on);
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toMatch(/^text\/event-stream/);
    expectNothingOfTheUpstream(response.body);
    const events: SseEvent[] = parseSse(response.body).events;
    const deltas = events.filter((event) => event.event === 'delta');
    const text = deltas.map((event) => event.data.content).join('');
    const last = events.at(-1)!;
    expect(events.map((event) => event.event)).toEqual(['user_message', ...deltas.map(() => 'delta'), last.event]);
    const rows = await storedMessages(project.id);
    // Failed when its turn stored no answer.
    const answered = hostile.stream === 'done' || text !== '';
    expect(rows[0]).toMatchObject({ id: (events[0]!.data.userMessage as { id: string }).id, role: 'user', content: QUESTION, status: answered ? 'complete' : 'failed' });
    const replies = rows.slice(1).map((row) => [row.role, row.content, row.status]);
    if (hostile.stream === 'done') {
      expect(last.event).toBe('done');
      expect(text).toBe(`Echo: ${QUESTION}`);
      expect(replies).toEqual([['assistant', text, 'complete']]);
    } else {
      const [status, code] = hostile.stream;
      expect(last).toMatchObject({ event: 'error', data: { status, code, userMessageId: rows[0]!.id } });
      expect(Object.keys(last.data).sort()).toEqual([...PROBLEM_MEMBERS, 'userMessageId'].sort());
      expect(replies).toEqual(text ? [['assistant', text, 'incomplete']] : []);
    }
    await expectUpstreamLeftAlone(hostile.name);
    await expectStillServing(on);
  });

  it('keeps a server process up through all of them, JSON and streamed (an unhandled rejection would end it)', async () => {
    // On PostgreSQL the server gets a database of its own; on the embedded default, its own folder.
    const ownDb = process.env.TEST_DATABASE_URL ? await createTestDatabase() : undefined;
    const server = await spawnServer({
      AI_BASE_URL: fake.url,
      AI_MAX_RETRIES: '0',
      // Room for 7 MB to be refused on a loaded machine (2 s was not, once, with the test files beside it
      // flooding logins and the fake in this process); the drip, a byte every 50 ms, still never ends in time.
      AI_TIMEOUT_MS: '5000',
      JWT_SECRET: TEST_SECRET,
      BCRYPT_ROUNDS: '4',
      ...(ownDb ? { DATABASE_URL: ownDb.url! } : {}),
    });
    try {
      await waitUntilServing(server);
      const post = (path: string, body: object, headers: Record<string, string> = {}) =>
        fetch(`${server.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
      const { token } = await (await post('/api/v1/auth/register', { email: uniqueEmail('process'), password: 'password-1', name: 'P' })).json();
      const auth = { authorization: `Bearer ${token}` };
      const project = await (await post('/api/v1/projects', { name: 'P' }, auth)).json();
      for (const hostile of cases) {
        for (const stream of [false, true]) {
          const what = `${hostile.name}${stream ? ', streamed' : ''}`;
          fake.enqueue(hostile.reply());
          const answered = await post(`/api/v1/projects/${project.id}/chat`, { message: QUESTION, stream }, auth)
            .then(async (response) => [response.status, await response.text()] as const)
            .catch((error: Error) => error.message);
          expect(server.child.exitCode, `${what}: the server ended, printing\n${server.output().slice(-3000)}`).toBeNull();
          expect(answered[0], `${what}: ${String(answered)}; the server printed\n${server.output().slice(-3000)}`).toBe(stream ? 200 : hostile.json[0]);
        }
      }
      expect((await fetch(`${server.url}/health`)).status).toBe(200);
    } finally {
      server.child.kill('SIGTERM');
      await server.exited;
      await ownDb?.drop();
    }
    // A process of its own starts (tsx, and the embedded database's first migration) slowly on a loaded machine.
  }, 120_000);
});
