import { once } from 'node:events';
import { type IncomingMessage, request as httpRequest } from 'node:http';
import { type AddressInfo, connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { DrizzleQueryError, sql } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { buildApp } from '../../src/app.js';
import { LOGGED_QUERY_VALUES, serializeError } from '../../src/http/logging.js';
import { createProject, registerUser, startTestApp, testConfig, type TestApp, uniqueEmail } from '../support/app.js';
import { multipart } from '../support/multipart.js';
import { createTestDatabase } from '../support/database.js';
import { FakeUpstream, UPSTREAM_ERROR_TEXT } from '../support/fake-upstream.js';
import { logCollector } from '../support/logs.js';

let t: TestApp;
beforeAll(async () => {
  t = await startTestApp();
});
afterAll(() => t.close());

/** An app logging at `level` into a collector, with a route that logs through `request.log`. */
async function loggingApp(level: string) {
  const logs = logCollector();
  // A provider configured, so that the start logs nothing of its own (no provider is a warning).
  const app = await buildApp(testConfig({ LOG_LEVEL: level, OPENAI_API_KEY: 'sk-logging-test' }), { database: t.testDb.database, logStream: logs.stream });
  app.get('/log', { config: { public: true } }, async (request) => {
    request.log.debug('a detail');
    request.log.warn({ body: { password: 'hunter2' }, step: 1 }, 'a warning');
    request.log.child({ step: 2 }).warn('from a child');
    return { level: request.log.level };
  });
  // A route that logs nothing itself: its request's last line is written as text (RequestLogger.completed).
  app.get('/quiet', { config: { public: true } }, async () => ({}));
  // The same two, behind a token.
  app.get('/quiet-account', async () => ({}));
  app.get('/log-account', async (request) => {
    request.log.warn('a warning');
    return {};
  });
  // A route with a level of its own: Fastify's own child logger, at once.
  app.get('/verbose', { config: { public: true }, logLevel: 'debug' }, async (request) => {
    request.log.debug('a detail');
    return {};
  });
  return { app, logs };
}

const linesOf = (logs: ReturnType<typeof logCollector>, requestId: string) => logs.lines.filter((line) => line.reqId === requestId);

describe('request logs', () => {
  it('carry the request id on every line a request logs, at warn, with secrets redacted', async () => {
    const { app, logs } = await loggingApp('warn');
    onTestFinished(() => app.close());
    const response = await app.inject({ method: 'GET', url: '/log', headers: { 'x-request-id': 'trace-warn-1' } });
    expect(response.statusCode).toBe(200);
    expect(response.headers['x-request-id']).toBe('trace-warn-1');
    expect(response.json()).toEqual({ level: 'warn' });
    const lines = linesOf(logs, 'trace-warn-1');
    expect(lines.map((line) => line.msg)).toEqual(['a warning', 'from a child']);
    expect(lines[0]).toMatchObject({ level: 40, body: { password: '[redacted]' }, step: 1 });
    expect(lines[1]).toMatchObject({ level: 40, step: 2 });
    // Nothing else was logged: not the debug line, not Fastify's per-request info lines.
    expect(logs.lines.filter((line) => line.level !== 40 || !line.reqId)).toEqual([]);
  });

  it("carry it on Fastify's own line at info, one a request with what was asked and how it went; and on a route's own level", async () => {
    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    const logged = await app.inject({ method: 'GET', url: '/log?limit=2', headers: { 'x-request-id': 'trace-info-1' } });
    const verbose = await app.inject({ method: 'GET', url: '/verbose' });
    const lines = linesOf(logs, 'trace-info-1');
    expect(lines.map((line) => line.msg)).toEqual(['a warning', 'from a child', 'request completed']);
    expect(lines[2]).toMatchObject({ level: 30, req: { method: 'GET', url: '/log?limit=2', remoteAddress: '127.0.0.1' }, res: { statusCode: 200 } });
    expect(lines[2]!.responseTime).toEqual(expect.any(Number));
    expect(logged.json()).toEqual({ level: 'info' });
    // At debug (the route's level), its arrival too.
    const requestId = verbose.headers['x-request-id'] as string;
    expect(requestId).toMatch(/^[0-9a-f-]{36}$/);
    expect(linesOf(logs, requestId).map((line) => line.msg)).toEqual(['incoming request', 'a detail', 'request completed']);
  });
});

/** A line's keys in their order, and the type of each value, all the way down: what a reader of the log parses. */
const shapeOf = (value: unknown): unknown =>
  typeof value === 'object' && value !== null ? Object.entries(value).map(([key, inner]) => [key, shapeOf(inner)]) : typeof value;

describe('the line of a request answered', () => {
  it("is written for a request that logged nothing as pino writes it for one that did: the same fields, in the same order", async () => {
    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    // Over a socket (an injected request has no port), with a host and a path given as they are.
    await app.listen({ host: '127.0.0.1', port: 0 });
    const get = async (path: string, requestId: string) => {
      // A version with characters JSON escapes: the line written as text escapes them as pino does.
      const headers = { 'accept-version': '2"\\', host: 'chat.example:8080', 'x-request-id': requestId };
      const request = httpRequest({ port: (app.server.address() as AddressInfo).port, path, headers }).end();
      const [response] = (await once(request, 'response')) as [IncomingMessage];
      await once(response.resume(), 'end');
    };
    await get('/quiet?limit=7&q=x', 'trace-quiet-1');
    await get('/log', 'trace-logged-1');
    const [quiet] = linesOf(logs, 'trace-quiet-1');
    const logged = linesOf(logs, 'trace-logged-1').find((line) => line.msg === 'request completed');
    expect(quiet).toEqual({
      level: 30,
      time: expect.any(Number),
      pid: process.pid,
      hostname: expect.any(String),
      reqId: 'trace-quiet-1',
      req: { method: 'GET', url: '/quiet?limit=7&q=[redacted]', version: '2"\\', host: 'chat.example:8080', remoteAddress: '127.0.0.1', remotePort: expect.any(Number) },
      res: { statusCode: 200 },
      responseTime: expect.any(Number),
      msg: 'request completed',
    });
    expect(shapeOf(quiet)).toEqual(shapeOf(logged));
    expect(logged!.req).toMatchObject({ url: '/log', version: '2"\\', host: 'chat.example:8080' });
  });

  // A support ticket ("my chat failed at 14:02") names an account: its requests were not to be found.
  it('names the account whose token the request carried, written as text or by pino alike, and none for a public route or a refused token', async () => {
    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    const user = await registerUser(app);
    const get = (url: string, requestId: string, headers: Record<string, string> = user.auth) =>
      app.inject({ method: 'GET', url, headers: { ...headers, 'x-request-id': requestId } });
    expect((await get('/quiet-account', 'account-quiet')).statusCode).toBe(200);
    expect((await get('/log-account', 'account-logged')).statusCode).toBe(200);
    expect((await get('/quiet', 'account-public')).statusCode).toBe(200);
    expect((await get('/quiet-account', 'account-refused', { authorization: `Bearer ${user.token}x` })).statusCode).toBe(401);
    const completed = (requestId: string) => linesOf(logs, requestId).find((line) => line.msg === 'request completed')!;
    const quiet = completed('account-quiet');
    expect(quiet.userId).toBe(user.id);
    expect(completed('account-logged').userId).toBe(user.id);
    expect(shapeOf(quiet)).toEqual(shapeOf(completed('account-logged')));
    expect(completed('account-public')).not.toHaveProperty('userId');
    expect(completed('account-refused')).not.toHaveProperty('userId');
  });

  it('is not written below its level, and leaves out what the request does not have (an injected one has no port)', async () => {
    const warn = await loggingApp('warn');
    onTestFinished(() => warn.app.close());
    await warn.app.inject({ method: 'GET', url: '/quiet' });
    expect(warn.logs.lines).toEqual([]);

    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    await app.inject({ method: 'GET', url: '/quiet', headers: { 'x-request-id': 'trace-bare-1' } });
    expect(Object.keys(linesOf(logs, 'trace-bare-1')[0]!.req as object)).toEqual(['method', 'url', 'host', 'remoteAddress']);
  });
});

describe('secrets in the logs', () => {
  it("leave out a token, cookies and a proxy's or a client's credentials wherever headers are logged: at trace, the uploads' parser logs its options", async () => {
    const { app, logs } = await loggingApp('trace');
    onTestFinished(() => app.close());
    const user = await registerUser(app);
    const project = await createProject(app, user);
    const form = multipart({ filename: 'a.txt', type: 'text/plain', content: 'some text' });
    const uploaded = await app.inject({
      method: 'POST',
      url: `/api/v1/projects/${project.id}/files`,
      headers: {
        ...user.auth,
        cookie: 'session=cookie-secret',
        'proxy-authorization': 'Basic proxy-secret',
        'x-api-key': 'api-key-secret',
        'x-auth-token': 'auth-token-secret',
        'cf-access-jwt-assertion': 'assertion-secret',
        'idempotency-key': 'kept-key',
        'x-kept': 'kept-value',
        ...form.headers,
      },
      payload: form.payload,
    });
    expect(uploaded.statusCode).toBe(201);
    expect(logs.lines.some((line) => JSON.stringify(line).includes('busboyOptions'))).toBe(true);
    const logged = JSON.stringify(logs.lines);
    for (const secret of [user.token, 'cookie-secret', 'proxy-secret', 'api-key-secret', 'auth-token-secret', 'assertion-secret']) expect(logged).not.toContain(secret);
    // What is no credential is logged as it came.
    for (const kept of ['kept-value', 'kept-key']) expect(logged).toContain(kept);
  });

  it("leave out passwords wherever an object logged holds them, in any logger's bindings, errors and instances too, and change nothing they log", async () => {
    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    const body = { email: 'someone@example.com', password: 'hunter2', newPassword: 'hunter3' };
    const options = { headers: { authorization: 'Bearer secret-token', accept: 'text/plain' } };
    class Account {
      constructor(
        readonly email: string,
        readonly password: string,
      ) {}
    }
    const withHeaders = (authorization: string) => Object.assign(new Error('failed'), { headers: Object.assign(Object.create({ kind: 'headers' }), { authorization }) });
    app.get('/secrets', { config: { public: true } }, async (request) => {
      request.log.child({ body }).info({ options }, 'a line');
      request.log.child({ step: 1 }).child({ form: { currentPassword: 'secret-1' } }).info('a child of a child');
      app.log.child({ form: { password: 'secret-2' } }).info("the app's child");
      request.log.warn(Object.assign(new Error('failed'), { password: 'hunter4' }), 'an error');
      request.log.warn({ err: withHeaders('secret-3'), cause: withHeaders('secret-4') }, 'errors with headers');
      request.log.info({ account: new Account('someone@example.com', 'secret-5') }, 'an instance');
      return {};
    });
    // Loggers that Fastify makes itself: a route's and a plugin's with a level of their own.
    app.get('/leveled', { config: { public: true }, logLevel: 'info' }, async (request) => {
      request.log.child({ form: { password: 'secret-6' } }).info("a leveled route's child");
      return {};
    });
    await app.register(
      async (plugin) => {
        plugin.log.child({ form: { newPassword: 'secret-7' } }).info("a leveled plugin's child");
      },
      { logLevel: 'info' },
    );
    expect((await app.inject({ method: 'GET', url: '/secrets' })).statusCode).toBe(200);
    expect((await app.inject({ method: 'GET', url: '/leveled' })).statusCode).toBe(200);
    const logged = JSON.stringify(logs.lines);
    const secrets = ['hunter2', 'hunter3', 'hunter4', 'secret-token', ...[1, 2, 3, 4, 5, 6, 7].map((n) => `secret-${n}`)];
    for (const secret of secrets) expect(logged).not.toContain(secret);
    const line = logs.lines.find((entry) => entry.msg === 'a line');
    expect(line).toMatchObject({
      body: { email: 'someone@example.com', password: '[redacted]', newPassword: '[redacted]' },
      options: { headers: { authorization: '[redacted]', accept: 'text/plain' } },
    });
    expect(logs.lines.find((entry) => entry.msg === 'an error')).toMatchObject({ err: { message: 'failed', password: '[redacted]' } });
    expect(logs.lines.find((entry) => entry.msg === 'an instance')).toMatchObject({ account: { email: 'someone@example.com', password: '[redacted]' } });
    for (const msg of ['a child of a child', "the app's child", "a leveled route's child", "a leveled plugin's child"]) {
      expect(logs.lines.find((entry) => entry.msg === msg)).toBeDefined();
    }
    // The objects are the caller's: logged without their secrets, kept with them.
    expect(body.password).toBe('hunter2');
    expect(options.headers.authorization).toBe('Bearer secret-token');
  });

  it('leave out the values of a query that no route takes, a token or a password sent there, on every line that logs a URL', async () => {
    const secret = 'eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl';
    const user = await registerUser(t.app);
    for (const level of ['info', 'debug']) {
      const { app, logs } = await loggingApp(level);
      onTestFinished(() => app.close());
      const get = async (url: string, headers: Record<string, string> = {}) =>
        (await app.inject({ method: 'GET', url, headers })).headers['x-request-id'] as string;
      const urlOf = (requestId: string) => (linesOf(logs, requestId).find((line) => line.msg === 'request completed')!.req as { url: string }).url;
      expect(urlOf(await get(`/quiet?access_token=${secret}&limit=5&cursor=abc&`))).toBe('/quiet?access_token=[redacted]&limit=5&cursor=abc&');
      expect(urlOf(await get(`/quiet?${secret}&password=${secret}`))).toBe('/quiet?[redacted]&password=[redacted]');
      expect(urlOf(await get(`/quiet?${secret}=1&limit`))).toBe('/quiet?[redacted]&limit');
      // A value the routes would not take, in a kept parameter: another query after it, a token as a cursor.
      expect(urlOf(await get(`/quiet?limit=5?access_token=${secret}&cursor=${secret}`))).toBe('/quiet?limit=[redacted]&cursor=[redacted]');
      // Over a socket (an injected request loses what follows a `#`): the router reads a query after `#` too.
      await app.listen({ host: '127.0.0.1', port: 0 });
      for (const path of [`/quiet#access_token=${secret}`, `/quiet?limit=1#access_token=${secret}`]) {
        const request = httpRequest({ port: (app.server.address() as AddressInfo).port, path, headers: { 'x-request-id': `hash-${level}-${path.length}` } }).end();
        const [response] = (await once(request, 'response')) as [IncomingMessage];
        await once(response.resume(), 'end');
      }
      expect(urlOf(`hash-${level}-${`/quiet#access_token=${secret}`.length}`)).toBe('/quiet#access_token=[redacted]');
      expect(urlOf(`hash-${level}-${`/quiet?limit=1#access_token=${secret}`.length}`)).toBe('/quiet?limit=[redacted]');
      // A route that refuses the query (400), one that does not exist (404), a token refused (401), a route that logs.
      await get(`/api/v1/projects?limit=2&password=${secret}`, user.auth);
      await get(`/nowhere?token=${secret}`);
      await get(`/api/v1/projects?token=${secret}`, { authorization: `Bearer ${secret}` });
      await get(`/log?key=${secret}`);
      expect(logs.lines.length).toBeGreaterThan(7);
      expect(logs.lines.filter((line) => JSON.stringify(line).includes(secret))).toEqual([]);
    }
  });

  it('keep the values of every query parameter the routes take, each one the document lists', async () => {
    const document = (await t.app.inject({ method: 'GET', url: '/openapi.json' })).json() as { paths: Record<string, Record<string, { parameters?: { in: string; name: string }[] }>> };
    const names = new Set(
      Object.values(document.paths).flatMap((item) => Object.values(item).flatMap((operation) => (operation.parameters ?? []).filter((p) => p.in === 'query').map((p) => p.name))),
    );
    expect([...names].sort()).toEqual(Object.keys(LOGGED_QUERY_VALUES).sort());
  });

  it('say a client gone mid-body is gone (499), not that the database is unavailable', async () => {
    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => {});
    await once(socket, 'connect');
    socket.write('POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"email":');
    await sleep(100);
    socket.destroy();
    await expect.poll(() => logs.lines.some((line) => String(line.msg).includes('request abandoned'))).toBe(true);
    // What was asked, though it was never answered: the line of its arrival is at debug.
    expect(logs.lines.find((line) => String(line.msg).includes('request abandoned'))).toMatchObject({
      req: { method: 'POST', url: '/api/v1/auth/login' },
    });
    await sleep(100);
    expect(JSON.stringify(logs.lines)).not.toContain('database is unavailable');
  });
});

// A 503 was logged with its code and detail alone: not what the upstream said, nor the question it named.
it('logs a rate limit that outlasted the retries with what the upstream answered and the question the failure names', async () => {
  const fake = await FakeUpstream.start();
  onTestFinished(() => fake.close());
  const logs = logCollector();
  const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini', AI_MAX_RETRIES: '0', LOG_LEVEL: 'warn' }), { logStream: logs.stream });
  onTestFinished(() => app.close());
  const owner = await registerUser(app);
  const projectId = (await createProject(app, owner)).id;
  fake.enqueue({ status: 429, retryAfter: 30, headers: { 'x-request-id': 'req_8f2c41' } });
  const refused = await app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'hi' } });
  expect(refused.statusCode).toBe(503);
  expect(logs.lines.find((line) => line.reqId === refused.json().requestId && line.msg === 'request failed')).toEqual(
    expect.objectContaining({
      level: 40,
      code: 'PROVIDER_RATE_LIMITED',
      // With the upstream's own id of the request, which its support asks for.
      upstream: expect.stringContaining(`upstream answered 429 (upstream request id req_8f2c41): {"error":{"message":"${UPSTREAM_ERROR_TEXT}"`),
      userMessageId: refused.json().userMessageId,
    }),
  );
});

describe('a failed statement in the logs', () => {
  it('leaves out its values wherever the error logged holds it: as a cause, aggregated, or as a property', () => {
    const failed = () => new DrizzleQueryError('insert into "users" ("email") values ($1)', ['someone@example.com'], new Error('the database said no'));
    const aggregated = new AggregateError([failed()], 'several failed');
    const held = Object.assign(new Error('a wrapper'), { inner: failed() });
    const caused = new Error('a wrapper', { cause: failed() });
    for (const error of [failed(), aggregated, held, caused]) {
      const logged = JSON.stringify(serializeError(error));
      expect(logged).not.toContain('someone@example.com');
      expect(logged).toContain('params: [redacted]');
    }
    expect(JSON.stringify(serializeError(held))).toContain('the database said no');
  });

  it('is logged without the values it carried: a password hash, an email, a name', async () => {
    const testDb = await createTestDatabase();
    onTestFinished(() => testDb.drop());
    const logs = logCollector();
    const app = await buildApp(testConfig({ LOG_LEVEL: 'warn' }), { database: testDb.database, logStream: logs.stream });
    onTestFinished(() => app.close());
    // A schema the code does not expect: the insert of a new user fails in the database.
    await testDb.database.db.execute(sql`alter table users rename column name to former_name`);
    const email = uniqueEmail('logged');
    const response = await app.inject({
      method: 'POST',
      url: '/api/v1/auth/register',
      payload: { email, password: 'correct horse battery', name: 'Name Of Record' },
    });
    expect(response.statusCode).toBe(500);
    const failure = logs.lines.find((line) => line.msg === 'request failed');
    expect(failure).toBeDefined();
    const logged = JSON.stringify(logs.lines);
    // What failed and why are kept: the statement and the database's own words.
    expect(logged).toContain('insert into \\"users\\"');
    expect(logged).toContain('column \\"name\\" of relation \\"users\\" does not exist');
    expect(logged).toContain('params: [redacted]');
    expect(logged).not.toContain(email);
    expect(logged).not.toContain('Name Of Record');
    expect(logged).not.toMatch(/\$2[aby]\$/);
  });
});
