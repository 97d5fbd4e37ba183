import type { FastifyInstance } from 'fastify';
import { createSigner } from 'fast-jwt';
import pg from 'pg';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { openPostgres } from '../../src/db/database.js';
import { prompts } from '../../src/db/schema.js';
import { createProject, createPrompt, expectProblem, registerUser, startTestApp, TEST_SECRET, testConfig, type TestApp, uniqueEmail } from '../support/app.js';
import { logCollector } from '../support/logs.js';
import { INVALID_UTF8 } from '../support/openapi-arbitraries.js';

let t: TestApp;
beforeAll(async () => {
  t = await startTestApp();
});
afterAll(() => t.close());

describe('problem+json for every error class', () => {
  it('400 validation with field paths', async () => {
    const body = expectProblem(
      await t.app.inject({ method: 'POST', url: '/api/v1/auth/register', payload: { email: 'bad', password: 'x', name: 'n' } }),
      400,
      'VALIDATION_ERROR',
    );
    expect(body.type).toBe('about:blank');
    expect(body.title).toBe('Bad Request');
    expect(body.instance).toBe('/api/v1/auth/register');
    expect(body.errors).toEqual(
      expect.arrayContaining([expect.objectContaining({ path: 'body.email', message: expect.any(String) })]),
    );
  });

  // zod's own words ("Too small: expected string to have >=1 characters") sat beside the service's in
  // one response: each field is now refused in one voice, a fragment after its path a UI can show.
  it('400 naming each field and why, in one voice, in a detail that is a sentence', async () => {
    const owner = await registerUser(t.app);
    const response = await t.app.inject({
      method: 'POST',
      url: '/api/v1/projects',
      headers: owner.auth,
      payload: { name: '   ', description: 'd'.repeat(2_001), provider: 'anthropic', model: 5, extra: true },
    });
    const body = expectProblem(response, 400, 'VALIDATION_ERROR');
    expect(body.detail).toBe("The request's body is not valid: see errors for each field");
    expect(body.errors).toEqual([
      { path: 'body.name', message: 'must not be empty' },
      { path: 'body.description', message: 'must be at most 2000 characters' },
      { path: 'body.provider', message: 'must be one of "openai", "openrouter"' },
      { path: 'body.model', message: 'must be a string' },
      { path: 'body', message: 'takes no property "extra"' },
    ]);
    const listed = expectProblem(await t.app.inject({ method: 'GET', url: '/api/v1/projects?limit=0', headers: owner.auth }), 400, 'VALIDATION_ERROR');
    expect([listed.detail, listed.errors]).toEqual(["The request's query string is not valid: see errors for each field", [{ path: 'querystring.limit', message: 'must be at least 1' }]]);
    expect((await t.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: {} })).json().errors).toEqual([
      { path: 'body.email', message: 'is required' },
      { path: 'body.password', message: 'is required' },
    ]);
  });

  it('400 that stays small however many properties are wrong', async () => {
    // A route that takes long bodies: on the others, 32 KiB of them is refused unread (413).
    const owner = await registerUser(t.app);
    const project = await createProject(t.app, owner);
    const payload = Object.fromEntries(Array.from({ length: 30_000 }, (_, i) => [`unknown${i}`, i]));
    const response = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/prompts`, headers: owner.auth, payload: { title: 't', content: 'c', ...payload } });
    const { errors } = expectProblem(response, 400, 'VALIDATION_ERROR') as { errors: { message: string }[] };
    expect(errors.length).toBeGreaterThan(0);
    expect(errors.length).toBeLessThanOrEqual(50);
    expect(errors[0]!.message).toContain('unknown0');
    expect(response.body.length).toBeLessThan(30_000);
  });

  it('400 for a body that is not JSON, an empty JSON body and a JSON body that is not an object', async () => {
    const headers = { 'content-type': 'application/json' };
    for (const payload of ['{"email":', '', '"just a string"', 'null', '[1,2]']) {
      const response = await t.app.inject({ method: 'POST', url: '/api/v1/auth/login', headers, payload });
      expectProblem(response, 400, 'VALIDATION_ERROR');
    }
  });

  it('no 400 for a request without a body that still says application/json, as fetch wrappers and requests send a DELETE', async () => {
    const user = await registerUser(t.app);
    const project = await createProject(t.app, user);
    const prompt = await createPrompt(t.app, user, project.id);
    const del = (url: string, headers: Record<string, string> = { 'content-type': 'application/json' }) =>
      t.app.inject({ method: 'DELETE', url, headers: { ...user.auth, ...headers } });
    expect((await del(`/api/v1/projects/${project.id}/messages`)).statusCode).toBe(204);
    expect((await del(`/api/v1/projects/${project.id}/messages`, { 'content-type': 'application/json; charset=utf-8', 'content-length': '0' })).statusCode).toBe(204);
    expect((await del(`/api/v1/projects/${project.id}/prompts/${prompt.id}`)).statusCode).toBe(204);
    expect((await del(`/api/v1/projects/${project.id}`)).statusCode).toBe(204);
    expectProblem(await del(`/api/v1/projects/${project.id}`), 404, 'NOT_FOUND');
    // A route that needs a body still refuses an empty one, naming it.
    const empty = await t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...user.auth, 'content-type': 'application/json' } });
    expect(expectProblem(empty, 400, 'VALIDATION_ERROR').errors).toEqual([expect.objectContaining({ path: 'body' })]);
    const deleteMe = await t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: { ...user.auth, 'content-type': 'application/json' } });
    expectProblem(deleteMe, 400, 'VALIDATION_ERROR');
  });

  it("no 415 for a DELETE without a body whatever Content-Type it names, as fetch sends `body: ''` and curl `-d ''`", async () => {
    const user = await registerUser(t.app);
    const project = await createProject(t.app, user);
    const prompt = await createPrompt(t.app, user, project.id);
    // An empty body, declared: fetch names a string body text/plain, curl -d names it a form.
    const del = (url: string, type: string) => t.app.inject({ method: 'DELETE', url, headers: { ...user.auth, 'content-type': type, 'content-length': '0' } });
    for (const type of ['text/plain;charset=UTF-8', 'application/x-www-form-urlencoded']) {
      expect((await del(`/api/v1/projects/${project.id}/messages`, type)).statusCode, type).toBe(204);
    }
    expect((await del(`/api/v1/projects/${project.id}/prompts/${prompt.id}`, 'text/plain;charset=UTF-8')).statusCode).toBe(204);
    expect((await del(`/api/v1/projects/${project.id}`, 'text/plain;charset=UTF-8')).statusCode).toBe(204);
    // A body that is not empty is still one of a type the API does not speak.
    const sent = await t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${project.id}/messages`, headers: { ...user.auth, 'content-type': 'text/plain' }, payload: 'x' });
    expectProblem(sent, 415, 'UNSUPPORTED_MEDIA_TYPE');
  });

  it('401 without credentials, and only errors on validation problems', async () => {
    const body = expectProblem(await t.app.inject({ method: 'GET', url: '/api/v1/auth/me' }), 401, 'UNAUTHORIZED');
    expect(body).not.toHaveProperty('errors');
  });

  it('401 with the challenge RFC 9110 requires: WWW-Authenticate names the bearer scheme', async () => {
    const user = await registerUser(t.app);
    const project = await createProject(t.app, user);
    // The signature's first character changed: all six of its bits count. (Its last two, replaced with
    // 'xx', decoded to the same signature about once in a thousand tokens: the last carries only four.)
    const signatureAt = user.token.lastIndexOf('.') + 1;
    const changed = user.token[signatureAt] === 'A' ? 'B' : 'A';
    const forged = { authorization: `Bearer ${user.token.slice(0, signatureAt)}${changed}${user.token.slice(signatureAt + 1)}` };
    const refused = [
      await t.app.inject({ method: 'GET', url: '/api/v1/auth/me' }),
      await t.app.inject({ method: 'GET', url: '/api/v1/projects', headers: forged }),
      // A route that checks the token in its own statement, and one that refuses a wrong password.
      await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: forged }),
      await t.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: user.email, password: 'not the password' } }),
    ];
    for (const response of refused) {
      expectProblem(response, 401, 'UNAUTHORIZED');
      expect(response.headers['www-authenticate']).toBe('Bearer');
    }
  });

  it('404 for an unknown route, authenticated or not', async () => {
    const user = await registerUser(t.app);
    expectProblem(await t.app.inject({ method: 'GET', url: '/api/v1/nothing-here' }), 404, 'NOT_FOUND');
    expectProblem(await t.app.inject({ method: 'DELETE', url: '/api/v1/nothing', headers: user.auth }), 404, 'NOT_FOUND');
  });

  it('413 for a body over the limit, and nothing stored', async () => {
    const response = await t.app.inject({
      method: 'POST',
      url: '/api/v1/auth/register',
      payload: { email: 'big@example.com', password: 'password-1', name: 'x'.repeat(2 * 1024 * 1024) },
    });
    expectProblem(response, 413, 'PAYLOAD_TOO_LARGE');
    const login = await t.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: 'big@example.com', password: 'password-1' } });
    expect(login.statusCode).toBe(401);
  });

  it('415 for a content type the route does not take', async () => {
    const response = await t.app.inject({
      method: 'POST',
      url: '/api/v1/auth/login',
      headers: { 'content-type': 'text/plain' },
      payload: 'email=a@b.c',
    });
    expectProblem(response, 415, 'UNSUPPORTED_MEDIA_TYPE');
  });

  it('415 for JSON that names a charset other than UTF-8, which it would be misread as; UTF-8 by any of its names is read', async () => {
    const user = await registerUser(t.app);
    const create = (contentType: string, payload: string | Buffer) =>
      t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...user.auth, 'content-type': contentType }, payload });
    const text = JSON.stringify({ name: 'Café' });
    for (const [contentType, payload] of [
      ['application/json; charset=utf-16le', Buffer.from(text, 'utf16le')],
      ['application/json; charset="UTF-16"', Buffer.from(text, 'utf16le')],
      ['application/json;charset=iso-8859-1', Buffer.from(text, 'latin1')],
    ] as const) {
      const refused = expectProblem(await create(contentType, payload), 415, 'UNSUPPORTED_MEDIA_TYPE');
      expect(refused.detail).toContain('UTF-8');
    }
    for (const contentType of [
      'application/json',
      'application/json; charset=utf-8',
      'application/json; charset="UTF-8"',
      'application/json; Charset=utf8',
      'application/json; charset=ascii',
      // A type named twice, and `charset=` within another parameter's quoted value: no charset but UTF-8.
      'application/json; charset=utf-8, application/json',
      'application/json; profile="a;charset=x"',
    ]) {
      const created = await create(contentType, Buffer.from(text));
      expect(created.statusCode, contentType).toBe(201);
      expect(created.json().name).toBe('Café');
    }
    const listed = await t.app.inject({ method: 'GET', url: '/api/v1/projects', headers: user.auth });
    expect(listed.json().data).toHaveLength(7);
  });

  it('400 for JSON whose bytes are not UTF-8, which decoding would turn into U+FFFD: no such text is stored, no such password matches', async () => {
    const user = await registerUser(t.app);
    const json = (prefix: string, bytes: readonly number[], suffix: string) => Buffer.concat([Buffer.from(prefix), Buffer.from(bytes), Buffer.from(suffix)]);
    const post = (url: string, payload: Buffer, headers: Record<string, string> = {}) =>
      t.app.inject({ method: 'POST', url, headers: { ...headers, 'content-type': 'application/json' }, payload });
    for (const bytes of INVALID_UTF8) {
      const refused = expectProblem(await post('/api/v1/projects', json('{"name":"bad', bytes, '"}'), user.auth), 400, 'VALIDATION_ERROR');
      expect(refused.detail).toContain('UTF-8');
      // Outside a string too: the same answer as any other byte JSON has no place for.
      expectProblem(await post('/api/v1/projects', json('{"name":"ok"', bytes, '}'), user.auth), 400, 'VALIDATION_ERROR');
    }
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/projects', headers: user.auth })).json().data).toEqual([]);

    // Eight 0xFF bytes and eight 0xFE bytes were both "\uFFFD" eight times: one password.
    const email = uniqueEmail();
    const credentials = (byte: number) => json(`{"email":"${email}","password":"`, Array(8).fill(byte), '","name":"Eve"}');
    expectProblem(await post('/api/v1/auth/register', credentials(0xff)), 400, 'VALIDATION_ERROR');
    const stored = await post('/api/v1/auth/register', Buffer.from(JSON.stringify({ email, password: '\ufffd'.repeat(8), name: 'Eve' })));
    expect(stored.statusCode).toBe(201);
    expectProblem(await post('/api/v1/auth/login', credentials(0xfe)), 400, 'VALIDATION_ERROR');
    // The same text sent as UTF-8 is read, and is that password.
    expect((await post('/api/v1/auth/login', Buffer.from(JSON.stringify({ email, password: '\ufffd'.repeat(8) })))).statusCode).toBe(200);
  });

  it('400 naming the field, never 500, for text the database cannot store (NUL), and nothing stored', async () => {
    const user = await registerUser(t.app);
    const project = await createProject(t.app, user);
    const prompts = `/api/v1/projects/${project.id}/prompts`;
    const refusals: [method: 'POST' | 'PATCH', url: string, payload: Record<string, unknown>, field: string][] = [
      ['POST', prompts, { title: 'a\u0000b', content: 'c' }, 'title'],
      ['POST', prompts, { title: 't', content: '\u0000' }, 'content'],
      ['PATCH', '/api/v1/auth/me', { name: 'n\u0000' }, 'name'],
      ['POST', '/api/v1/projects', { name: 'n\u0000' }, 'name'],
      ['PATCH', `/api/v1/projects/${project.id}`, { description: '\u0000' }, 'description'],
      ['PATCH', `/api/v1/projects/${project.id}`, { model: 'gpt\u0000' }, 'model'],
      ['POST', `/api/v1/projects/${project.id}/chat`, { message: 'hi\u0000' }, 'message'],
    ];
    for (const [method, url, payload, field] of refusals) {
      const refused = expectProblem(await t.app.inject({ method, url, headers: user.auth, payload }), 400, 'VALIDATION_ERROR');
      expect(refused.errors, `${method} ${url}`).toEqual([{ path: `body.${field}`, message: 'must not contain NUL (U+0000)' }]);
    }
    expect((await t.app.inject({ method: 'GET', url: prompts, headers: user.auth })).json()).toMatchObject({ data: [] });
    expect((await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}/messages`, headers: user.auth })).json()).toMatchObject({ data: [] });
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth })).json()).toMatchObject({ user: { name: 'Test User' } });
  });

  it('problem+json for what the router refuses: a path parameter over its length limit (404) and bad percent-encoding (400)', async () => {
    const user = await registerUser(t.app);
    const refused = [
      await t.app.inject({ method: 'GET', url: `/api/v1/projects/${'a'.repeat(5_000)}`, headers: user.auth }),
      await t.app.inject({ method: 'GET', url: '/api/v1/projects/%E0%A4%A/prompts', headers: user.auth }),
      await t.app.inject({ method: 'DELETE', url: '/api/v1/projects/%zz' }),
    ];
    expectProblem(refused[0]!, 404, 'NOT_FOUND');
    expectProblem(refused[1]!, 400, 'VALIDATION_ERROR');
    expectProblem(refused[2]!, 400, 'VALIDATION_ERROR');
    // No hook runs for these: the security headers are the error path's own.
    for (const response of refused) {
      expect(response.headers['x-content-type-options']).toBe('nosniff');
      expect(response.headers['content-security-policy']).toBe("default-src 'none'; frame-ancestors 'none'");
    }
  });

  // Each was VALIDATION_ERROR, a code that comes with 400, under another status.
  it("a plugin's own 4xx with the code its status always comes with: the docs' static files' 403 and 416", async () => {
    expectProblem(await t.app.inject({ method: 'GET', url: '/docs/static/%00' }), 403, 'FORBIDDEN');
    expectProblem(await t.app.inject({ method: 'GET', url: '/docs/static/swagger-ui.css', headers: { range: 'bytes=999999999-' } }), 416, 'RANGE_NOT_SATISFIABLE');
  });

  it('500 shows nothing of the cause and logs it with the request id', async () => {
    const logs = logCollector();
    const app = await buildApp(testConfig({ LOG_LEVEL: 'info' }), { database: t.testDb.database, logStream: logs.stream });
    app.get('/boom', { config: { public: true } }, async () => {
      throw new Error('select password_hash from users; key sk-live-123 at /srv/app.ts:1');
    });
    try {
      const response = await app.inject({ method: 'GET', url: '/boom' });
      const body = expectProblem(response, 500, 'INTERNAL');
      expect(body.detail).toBe('An unexpected error occurred');
      for (const secret of ['password_hash', 'sk-live-123', 'app.ts', 'stack']) expect(response.body).not.toContain(secret);
      const logged = logs.lines.find((line) => line.msg === 'request failed');
      // Not meant to happen: at error, with the stack to find it by.
      expect(logged).toMatchObject({ level: 50, reqId: body.requestId, code: 'INTERNAL', err: { message: expect.stringContaining('sk-live-123'), stack: expect.stringContaining('\n    at ') } });
    } finally {
      await app.close();
    }
  });

  it('503 of a full password-hashing queue is logged as a refusal: warn, its code and detail, no stack', async () => {
    const logs = logCollector();
    const config = testConfig({ LOG_LEVEL: 'info', BCRYPT_ROUNDS: '10', PASSWORD_HASH_THREADS: '1', PASSWORD_HASH_QUEUE: '0' });
    const app = await buildApp(config, { database: t.testDb.database, logStream: logs.stream });
    try {
      // One thread, no queue: the unknown emails' comparisons are asked for at once, and all but one refused.
      const login = () => app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: uniqueEmail('nobody'), password: 'password-1' } });
      const refused = (await Promise.all(Array.from({ length: 4 }, login))).filter((response) => response.statusCode === 503);
      expect(refused.length).toBeGreaterThan(0);
      for (const response of refused) {
        const { requestId, detail } = expectProblem(response, 503, 'SERVICE_UNAVAILABLE');
        const logged = logs.lines.filter((line) => line.reqId === requestId && Number(line.level) >= 40);
        expect(logged).toEqual([expect.objectContaining({ level: 40, msg: 'request failed', code: 'SERVICE_UNAVAILABLE', detail })]);
        expect(logged[0]).not.toHaveProperty('err');
        expect(JSON.stringify(logged)).not.toContain('    at ');
      }
    } finally {
      await app.close();
    }
  });
});

it('404 when a write finds its parent gone (a foreign key violation from the database)', async () => {
  const app = await buildApp(testConfig(), { database: t.testDb.database });
  // A real violation: a prompt row under a project id that does not exist.
  app.get('/orphan', { config: { public: true } }, async () => {
    const now = new Date();
    await t.testDb.database.db.insert(prompts).values({ id: uuidv7(), projectId: uuidv7(), title: 't', content: 'c', createdAt: now, updatedAt: now });
  });
  try {
    expectProblem(await app.inject({ method: 'GET', url: '/orphan' }), 404, 'NOT_FOUND');
  } finally {
    await app.close();
  }
});

describe('when the database is down', () => {
  // A real PostgreSQL client pointed at a port where nothing listens: every query fails to connect.
  const down = openPostgres('postgres://postgres@127.0.0.1:1/nothing', { connectionTimeoutMs: 500 });
  const logs = logCollector();
  let app: Awaited<ReturnType<typeof buildApp>>;
  beforeAll(async () => {
    app = await buildApp(testConfig({ LOG_LEVEL: 'warn' }), { database: down, logStream: logs.stream });
  });
  afterAll(async () => {
    await app.close();
    await down.close();
  });

  it('/health answers 503 with the database named, /health/live still 200', async () => {
    const body = expectProblem(await app.inject({ method: 'GET', url: '/health' }), 503, 'SERVICE_UNAVAILABLE');
    expect(body.checks).toEqual({ database: 'down' });
    const live = await app.inject({ method: 'GET', url: '/health/live' });
    expect(live.statusCode).toBe(200);
    expect(live.json()).toEqual({ status: 'ok' });
  });

  it('/health checks made at once share one ping, and say the database is down once', async () => {
    const down = () => logs.lines.filter((line) => line.msg === 'health check: database down').length;
    const before = down();
    const checks = await Promise.all(Array.from({ length: 50 }, () => app.inject({ method: 'GET', url: '/health' })));
    for (const check of checks) expectProblem(check, 503, 'SERVICE_UNAVAILABLE');
    // One ping, or a few should one fail before every check has begun: never one a check.
    expect(down() - before).toBeLessThanOrEqual(5);
  });

  it('routes that need the database answer 503 SERVICE_UNAVAILABLE, never 500', async () => {
    expectProblem(
      await app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: 'a@example.com', password: 'password-1' } }),
      503,
      'SERVICE_UNAVAILABLE',
    );
    const token = createSigner({ key: TEST_SECRET, algorithm: 'HS256', expiresIn: 60_000 })({ sub: uuidv7(), email: 'a@example.com', ver: 0 });
    const body = expectProblem(
      await app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: { authorization: `Bearer ${token}` } }),
      503,
      'SERVICE_UNAVAILABLE',
    );
    expect(JSON.stringify(body)).not.toMatch(/ECONNREFUSED|127\.0\.0\.1|postgres:/);
    // An outage's every request: a warning naming what said the database was down, not a stack each.
    expect(logs.lines.find((line) => line.reqId === body.requestId)).toEqual(
      expect.objectContaining({ level: 40, msg: 'request failed', code: 'SERVICE_UNAVAILABLE', reason: 'ECONNREFUSED' }),
    );
    expect(JSON.stringify(logs.lines.filter((line) => line.msg === 'request failed'))).not.toContain('    at ');
  });
});

/**
 * The service on the PostgreSQL database named `name` on TEST_DATABASE_URL's server, which refuses its
 * connections: a login answered 503 SERVICE_UNAVAILABLE, and that request's log line.
 */
async function loginRefusedOn(name: string, use: (app: FastifyInstance, logged: Record<string, unknown> | undefined) => Promise<void>): Promise<void> {
  const url = new URL(process.env.TEST_DATABASE_URL!);
  url.pathname = `/${name}`;
  const database = openPostgres(url.href, { connectionTimeoutMs: 2_000 });
  const logs = logCollector();
  const app = await buildApp(testConfig({ LOG_LEVEL: 'warn' }), { database, logStream: logs.stream });
  try {
    const login = { method: 'POST', url: '/api/v1/auth/login', payload: { email: 'a@example.com', password: 'password-1' } } as const;
    const body = expectProblem(await app.inject(login), 503, 'SERVICE_UNAVAILABLE');
    await use(app, logs.lines.find((line) => line.reqId === body.requestId));
  } finally {
    await app.close();
    await database.close();
  }
}

// Closed for maintenance, a database refuses every connection with 55000, a code other states share: each was a 500 INTERNAL.
it.runIf(process.env.TEST_DATABASE_URL)('answers 503 SERVICE_UNAVAILABLE, never 500, while its database takes no connections', async () => {
  const admin = new pg.Client({ connectionString: process.env.TEST_DATABASE_URL });
  await admin.connect();
  const name = `closed_${uuidv7().replaceAll('-', '')}`;
  await admin.query(`create database ${name}`);
  await admin.query(`alter database ${name} allow_connections false`);
  try {
    await loginRefusedOn(name, async (_app, logged) => {
      // Named by its code, as every other reason is: the message is in the server's language.
      expect(logged).toEqual(expect.objectContaining({ level: 40, reason: '55000' }));
    });
  } finally {
    await admin.query(`drop database ${name}`);
    await admin.end();
  }
});

// A database dropped under a running service (or its login refused): every new connection is refused by
// PostgreSQL itself, with a code of its own, not by the network. Each was a 500 INTERNAL.
it.runIf(process.env.TEST_DATABASE_URL)('answers 503 SERVICE_UNAVAILABLE, never 500, once its database no longer exists', async () => {
  await loginRefusedOn(`no_such_database_${uuidv7().replaceAll('-', '')}`, async (app, logged) => {
    // No wait mends it, as it mends an outage: an operator must, told at error.
    expect(logged).toEqual(expect.objectContaining({ level: 50, reason: '3D000' }));
    expectProblem(await app.inject({ method: 'GET', url: '/health' }), 503, 'SERVICE_UNAVAILABLE');
  });
});

describe('request ids', () => {
  it('generates one when absent and puts it on every response', async () => {
    const ok = await t.app.inject({ method: 'GET', url: '/health/live' });
    const failed = await t.app.inject({ method: 'GET', url: '/api/v1/auth/me' });
    const missing = await t.app.inject({ method: 'GET', url: '/nowhere' });
    for (const response of [ok, failed, missing]) expect(response.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    expect(new Set([ok, failed, missing].map((r) => r.headers['x-request-id'])).size).toBe(3);
  });

  it('echoes a well-formed incoming id and replaces a malformed one', async () => {
    const echoed = await t.app.inject({ method: 'GET', url: '/health/live', headers: { 'x-request-id': 'trace-abc.123:x' } });
    expect(echoed.headers['x-request-id']).toBe('trace-abc.123:x');
    for (const bad of ['has spaces', 'x'.repeat(200), '<script>', 'a\u00e9b']) {
      const response = await t.app.inject({ method: 'GET', url: '/health/live', headers: { 'x-request-id': bad } });
      expect(response.headers['x-request-id']).not.toBe(bad);
      expect(response.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    }
  });

  it('carries the id in every log line of the request', async () => {
    const logs = logCollector();
    const app = await buildApp(testConfig({ LOG_LEVEL: 'info' }), { database: t.testDb.database, logStream: logs.stream });
    try {
      await app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: { 'x-request-id': 'req-log-1', authorization: 'Bearer secret-token' } });
      const lines = logs.lines.filter((line) => line.reqId === 'req-log-1');
      expect(lines.length).toBeGreaterThanOrEqual(2); // incoming request, rejection, completion
      expect(logs.lines.filter((line) => line.req || line.res).every((line) => typeof line.reqId === 'string')).toBe(true);
      expect(JSON.stringify(logs.lines)).not.toContain('secret-token');
    } finally {
      await app.close();
    }
  });
});
