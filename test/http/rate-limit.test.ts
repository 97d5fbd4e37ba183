import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { buildApp } from '../../src/app.js';
import { createProject, expectProblem, type RegisteredUser, startTestAppWithUpstream, testConfig, type TestAppWithUpstream } from '../support/app.js';
import { logCollector } from '../support/logs.js';
import { freePort } from '../support/server-process.js';

const LIMITS = { RATE_LIMIT_LOGIN: '3', RATE_LIMIT_REGISTER: '2', RATE_LIMIT_CHAT: '2', RATE_LIMIT_API: '5' };
const PASSWORD = 'correct horse battery';
const REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

let t: TestAppWithUpstream;
beforeAll(async () => {
  t = await startTestAppWithUpstream(LIMITS);
});
afterAll(() => t.close());

/** Each test comes from its own addresses, so that the counters of one never reach another. */
let lastAddress = 0;
const newAddress = () => `10.0.${Math.floor(++lastAddress / 250)}.${lastAddress % 250}`;

const register = (app: FastifyInstance, remoteAddress: string, email = `${randomUUID()}@example.com`) =>
  app.inject({ method: 'POST', url: '/api/v1/auth/register', remoteAddress, payload: { email, password: PASSWORD, name: 'Rate' } });

const login = (app: FastifyInstance, remoteAddress: string, email: string, password = 'wrong password') =>
  app.inject({ method: 'POST', url: '/api/v1/auth/login', remoteAddress, payload: { email, password } });

async function newUser(app: FastifyInstance = t.app): Promise<RegisteredUser> {
  const response = await register(app, newAddress());
  expect(response.statusCode).toBe(201);
  const { token, user } = response.json();
  return { id: user.id, email: user.email, password: PASSWORD, token, auth: { authorization: `Bearer ${token}` } };
}

function expectRateLimited(response: Awaited<ReturnType<FastifyInstance['inject']>>, windowSeconds: number): void {
  expectProblem(response, 429, 'RATE_LIMITED');
  const retryAfter = Number(response.headers['retry-after']);
  expect(retryAfter).toBeGreaterThanOrEqual(1);
  expect(retryAfter).toBeLessThanOrEqual(windowSeconds);
}

describe('login', () => {
  it('stops a brute force on one email from one address with 429 RATE_LIMITED and Retry-After, even with the right password', async () => {
    const user = await newUser();
    const address = newAddress();
    for (let attempt = 0; attempt < 3; attempt++) expectProblem(await login(t.app, address, user.email), 401, 'UNAUTHORIZED');
    expectRateLimited(await login(t.app, address, user.email, PASSWORD), 15 * 60);
    // The same email in another case and with spaces is the same account.
    expectRateLimited(await login(t.app, address, ` ${user.email.toUpperCase()} `, PASSWORD), 15 * 60);
  });

  it('counts per address and email: another email from that address, and that email from elsewhere, still get through', async () => {
    const user = await newUser();
    const other = await newUser();
    const address = newAddress();
    for (let attempt = 0; attempt < 4; attempt++) await login(t.app, address, user.email);
    expect((await login(t.app, address, other.email, PASSWORD)).statusCode).toBe(200);
    expect((await login(t.app, newAddress(), user.email, PASSWORD)).statusCode).toBe(200);
  });

  it('counts an IPv6 client by its /64, whichever of its addresses it sends from, and an IPv4 one written as IPv6 as itself', async () => {
    const user = await newUser();
    // A /64 is the least one home line or server is given: its 2^64 addresses are one client's.
    const group = (++lastAddress).toString(16);
    const prefix = `2001:db8:${group}:0`;
    for (const address of [`${prefix}::1`, `${prefix}:a:b:c:d`, `${prefix}:0:0:ffff:1`]) {
      expectProblem(await login(t.app, address, user.email), 401, 'UNAUTHORIZED');
    }
    expectRateLimited(await login(t.app, `${prefix}:ffff:ffff:ffff:ffff`, user.email, PASSWORD), 15 * 60);
    // However it is written.
    expectRateLimited(await login(t.app, `2001:0DB8:${group.padStart(4, '0')}:0000::9`, user.email, PASSWORD), 15 * 60);
    // The next /64 is another client.
    expect((await login(t.app, `2001:db8:${group}:1::1`, user.email, PASSWORD)).statusCode).toBe(200);

    const address = newAddress();
    expect((await register(t.app, address)).statusCode).toBe(201);
    expect((await register(t.app, `::ffff:${address}`)).statusCode).toBe(201);
    expectRateLimited(await register(t.app, `::ffff:${address}`), 60 * 60);
  });

  it('counts rejected attempts too: malformed ones and successful ones alike', async () => {
    const user = await newUser();
    const address = newAddress();
    const malformed = { email: user.email, password: PASSWORD, rememberMe: true };
    expectProblem(await t.app.inject({ method: 'POST', url: '/api/v1/auth/login', remoteAddress: address, payload: malformed }), 400, 'VALIDATION_ERROR');
    expect((await login(t.app, address, user.email, PASSWORD)).statusCode).toBe(200);
    expectProblem(await login(t.app, address, user.email), 401, 'UNAUTHORIZED');
    expectRateLimited(await login(t.app, address, user.email, PASSWORD), 15 * 60);
  });
});

describe('login, against a flood of other emails', () => {
  const filler = (address: string) =>
    t.app.inject({ method: 'POST', url: '/api/v1/auth/login', remoteAddress: address, payload: { email: `${randomUUID()}@example.com` } });

  it('limits the failed logins of an address to RATE_LIMIT_LOGIN for each of 10 accounts, whatever the emails', async () => {
    const user = await newUser();
    const address = newAddress();
    for (let attempt = 0; attempt < 3; attempt++) expectProblem(await login(t.app, address, user.email), 401, 'UNAUTHORIZED');
    expectRateLimited(await login(t.app, address, user.email), 15 * 60);

    const statuses = new Map<number, number>();
    for (let i = 0; i < 5_000; i++) {
      const { statusCode } = await filler(address);
      statuses.set(statusCode, (statuses.get(statusCode) ?? 0) + 1);
    }
    // 30 failures from the address in all: the 3 above and 27 fillers; the rest refused before they are counted.
    expect(Object.fromEntries(statuses)).toEqual({ 400: 27, 429: 4_973 });
    expectRateLimited(await login(t.app, address, user.email, PASSWORD), 15 * 60);
  });

  it('lets no more failures through from an address than its cap, though they all come at once', async () => {
    const address = newAddress();
    // 60 at once: before any is counted a failure, all of them would pass a check of the count alone.
    const burst = await Promise.all(Array.from({ length: 60 }, () => login(t.app, address, `${randomUUID()}@example.com`)));
    const statuses = Object.fromEntries([401, 429].map((status) => [status, burst.filter((r) => r.statusCode === status).length]));
    expect(statuses).toEqual({ 401: 30, 429: 30 });
    expectRateLimited(await login(t.app, address, `${randomUUID()}@example.com`), 15 * 60);

    // Logins that succeed hold no room once answered: 30 failures still get through after them.
    const users = await Promise.all(Array.from({ length: 10 }, () => newUser()));
    const other = newAddress();
    const signedIn = await Promise.all(users.map((user) => login(t.app, other, user.email, PASSWORD)));
    expect(signedIn.map((r) => r.statusCode)).toEqual(Array(10).fill(200));
    for (let attempt = 0; attempt < 30; attempt++) expectProblem(await login(t.app, other, `${randomUUID()}@example.com`), 401, 'UNAUTHORIZED');
    expectRateLimited(await login(t.app, other, `${randomUUID()}@example.com`), 15 * 60);
  });

  /** Logins of a wrong password, each sent whole over a connection of its own that is closed at once. */
  async function hangUpLogins(app: FastifyInstance, count: number): Promise<ServerResponse[]> {
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const answers: ServerResponse[] = [];
    const seen = (_request: IncomingMessage, response: ServerResponse) => answers.push(response);
    app.server.on('request', seen);
    for (let i = 0; i < count; i++) {
      const body = JSON.stringify({ email: `${randomUUID()}@example.com`, password: 'wrong password' });
      const socket = connect(port, '127.0.0.1');
      await once(socket, 'connect');
      socket.write(`POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
      socket.destroy();
    }
    await waitFor(() => answers.length === count);
    app.server.off('request', seen);
    return answers;
  }

  it('counts a failed login whose client hangs up before its answer', { timeout: 60_000 }, async () => {
    // 30 failures, the cap of an address (3 logins for each of 10 accounts). Each is compared (401) or,
    // its client gone while it waited for a hashing thread, given up (499): a failure counted either way.
    const hungUp = await hangUpLogins(t.app, 30);
    // Its status is set once its failure is counted (the count comes before the answer is made).
    await waitFor(() => hungUp.every((answer) => answer.statusCode !== 200), 30_000);
    expect(hungUp.filter((answer) => ![401, 499].includes(answer.statusCode))).toEqual([]);
    // A right password is not a failure: it is 429 once the 30 are counted, for the rest of the window.
    const user = await newUser();
    const { port } = t.app.server.address() as AddressInfo;
    const response = await fetch(`http://127.0.0.1:${port}/api/v1/auth/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email: user.email, password: PASSWORD }),
    });
    expect(response.status).toBe(429);
    expect(Number(response.headers.get('retry-after'))).toBeGreaterThan(10 * 60);
  });

  // The room of a login whose client hung up was given back when its connection closed, while its
  // password was still being compared: the failures being compared then, and counted later, came on
  // top of the cap.
  it('holds the room of a login whose client hung up until its password is compared and the failure counted', { timeout: 60_000 }, async () => {
    // A cap of 10 failures, and comparisons slow enough (cost 12) to be running when the clients are gone.
    const app = await buildApp(testConfig({ RATE_LIMIT_LOGIN: '1', BCRYPT_ROUNDS: '12' }), { database: t.testDb.database });
    onTestFinished(() => app.close());
    // The hash that an unknown email is compared against, made first.
    await login(app, newAddress(), `${randomUUID()}@example.com`);
    const hungUp = await hangUpLogins(app, 10);
    await waitFor(() => hungUp.every((answer) => answer.closed), 30_000);
    const { port } = app.server.address() as AddressInfo;
    const wrong = () =>
      fetch(`http://127.0.0.1:${port}/api/v1/auth/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ email: `${randomUUID()}@example.com`, password: 'wrong password' }),
      });
    const after = await Promise.all([wrong(), wrong(), wrong()]);
    expect(after.map((response) => response.status)).toEqual([429, 429, 429]);
  });

  it('counts only failures against an address: the users behind one (a NAT, a proxy) all sign in', async () => {
    const address = newAddress();
    for (let i = 0; i < 40; i++) expect((await login(t.app, address, (await newUser()).email, PASSWORD)).statusCode).toBe(200);
  });

  // Logins of the right password that the server could not check then (its one hashing thread busy, no
  // queue): 503s counted as failures locked the address out once there were 10 (RATE_LIMIT_LOGIN of 1).
  it("does not count the server's own 503s as failed logins", async () => {
    // Each login a user of its own (the limit per address and email is 1): pairs at once, until more 503s
    // than the address's cap of failures (10) have come, however the two of a pair happen to overlap.
    const busy = await startTestAppWithUpstream({ RATE_LIMIT_LOGIN: '1', RATE_LIMIT_REGISTER: '1000', PASSWORD_HASH_THREADS: '1', PASSWORD_HASH_QUEUE: '0' });
    try {
      const address = newAddress();
      const statuses: number[] = [];
      const refused = () => statuses.filter((status) => status === 503).length;
      for (let pair = 0; pair < 60 && refused() <= 10; pair++) {
        const users = [await newUser(busy.app), await newUser(busy.app)];
        const both = await Promise.all(users.map((user) => login(busy.app, address, user.email, PASSWORD)));
        statuses.push(...both.map((response) => response.statusCode));
      }
      expect(statuses).not.toContain(429);
      expect(refused()).toBeGreaterThan(10);
      expect((await login(busy.app, address, (await newUser(busy.app)).email, PASSWORD)).statusCode).toBe(200);
    } finally {
      await busy.close();
    }
  });

  it('keeps the counters of a guessed account through a flood from 5,000 other addresses', async () => {
    const user = await newUser();
    const address = newAddress();
    for (let attempt = 0; attempt < 3; attempt++) expectProblem(await login(t.app, address, user.email), 401, 'UNAUTHORIZED');
    for (let i = 0; i < 5_000; i++) expectProblem(await filler(newAddress()), 400, 'VALIDATION_ERROR');
    expectRateLimited(await login(t.app, address, user.email, PASSWORD), 15 * 60);
  });
});

describe('register', () => {
  it('allows RATE_LIMIT_REGISTER accounts per address an hour, counting refused ones', async () => {
    const address = newAddress();
    const email = `${randomUUID()}@example.com`;
    expect((await register(t.app, address, email)).statusCode).toBe(201);
    expectProblem(await register(t.app, address, email), 409, 'CONFLICT');
    expectRateLimited(await register(t.app, address), 60 * 60);
    expect((await register(t.app, newAddress())).statusCode).toBe(201);
  });
});

describe('behind a load balancer (TRUST_PROXY)', () => {
  it("counts each client by the address the balancer forwards, not the balancer's own", async () => {
    const app = await buildApp(testConfig({ ...LIMITS, TRUST_PROXY: '1' }), { database: t.testDb.database });
    try {
      const balancer = newAddress();
      const via = (client: string) =>
        app.inject({
          method: 'POST',
          url: '/api/v1/auth/register',
          remoteAddress: balancer,
          headers: { 'x-forwarded-for': client },
          payload: { email: `${randomUUID()}@example.com`, password: PASSWORD, name: 'Rate' },
        });
      const [first, second] = [newAddress(), newAddress()];
      expect((await via(first)).statusCode).toBe(201);
      expect((await via(first)).statusCode).toBe(201);
      expectRateLimited(await via(first), 60 * 60);
      expect((await via(second)).statusCode).toBe(201);
    } finally {
      await app.close();
    }
  });

  it('keeps no more of a forwarded address that is none (TRUST_PROXY=true: whatever a client writes) than an address takes', async () => {
    const app = await buildApp(testConfig({ ...LIMITS, TRUST_PROXY: 'true' }), { database: t.testDb.database });
    try {
      // 10 KB each, as the headers allow 16: the same first 64 characters, then each its own.
      const garbage = `${randomUUID()}-${'x'.repeat(10_000)}`;
      const anonymous = (end: number) =>
        app.inject({ method: 'GET', url: '/api/v1/projects', remoteAddress: newAddress(), headers: { 'x-forwarded-for': `${garbage}${end}` } });
      for (let attempt = 0; attempt < 5; attempt++) expectProblem(await anonymous(attempt), 401, 'UNAUTHORIZED');
      // One counter for all of them: its key is the first 64 characters, not each one's 10 KB.
      expectRateLimited(await anonymous(5), 60);
    } finally {
      await app.close();
    }
  });

  it('counts a client the balancer forwards with its port (as Azure Application Gateway does) by its address, whichever port', async () => {
    const app = await buildApp(testConfig({ ...LIMITS, TRUST_PROXY: '1' }), { database: t.testDb.database });
    try {
      const user = await newUser();
      const attempt = (client: string, password?: string) =>
        app.inject({
          method: 'POST',
          url: '/api/v1/auth/login',
          remoteAddress: newAddress(),
          headers: { 'x-forwarded-for': client },
          payload: { email: user.email, password: password ?? 'wrong password' },
        });
      // Each connection comes from a port of its own: the port is no part of who the client is.
      const address = newAddress();
      for (const port of [40001, 40002, 40003]) expectProblem(await attempt(`${address}:${port}`), 401, 'UNAUTHORIZED');
      expectRateLimited(await attempt(`${address}:40004`, PASSWORD), 15 * 60);
      expectRateLimited(await attempt(address, PASSWORD), 15 * 60);

      const prefix = `2001:db8:${(++lastAddress).toString(16)}:0`;
      for (const port of [40001, 40002, 40003]) expectProblem(await attempt(`[${prefix}::${port - 40000}]:${port}`), 401, 'UNAUTHORIZED');
      expectRateLimited(await attempt(`${prefix}::1`, PASSWORD), 15 * 60);
    } finally {
      await app.close();
    }
  });
});

describe('authenticated routes', () => {
  it('allows RATE_LIMIT_API requests per user a minute, whatever their answer, then 429 for that user only', async () => {
    const user = await newUser();
    const other = await newUser();
    const me = () => t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth });
    expect((await me()).statusCode).toBe(200);
    expectProblem(await t.app.inject({ method: 'GET', url: `/api/v1/projects/${randomUUID()}`, headers: user.auth }), 404, 'NOT_FOUND');
    expectProblem(await t.app.inject({ method: 'GET', url: '/api/v1/projects?limit=0', headers: user.auth }), 400, 'VALIDATION_ERROR');
    expect((await me()).statusCode).toBe(200);
    // From another address: the limit is the user's, not the address's.
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth, remoteAddress: newAddress() })).statusCode).toBe(200);
    expectRateLimited(await me(), 60);
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: other.auth })).statusCode).toBe(200);
  });

  it('counts requests that fail authentication against their address, then answers them 429', async () => {
    const address = newAddress();
    const anonymous = (authorization?: string) =>
      t.app.inject({ method: 'GET', url: '/api/v1/projects', remoteAddress: address, headers: authorization ? { authorization } : {} });
    for (let attempt = 0; attempt < 3; attempt++) expectProblem(await anonymous(), 401, 'UNAUTHORIZED');
    for (let attempt = 0; attempt < 2; attempt++) expectProblem(await anonymous(`Bearer guess-${attempt}`), 401, 'UNAUTHORIZED');
    expectRateLimited(await anonymous('Bearer another-guess'), 60);
    // A real user at that address is counted as themselves.
    const user = await newUser();
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/projects', remoteAddress: address, headers: user.auth })).statusCode).toBe(200);
    expectProblem(await t.app.inject({ method: 'GET', url: '/api/v1/projects', remoteAddress: newAddress() }), 401, 'UNAUTHORIZED');
  });

  it('limits the password checks of a session (a password change, an account deletion) like logins: RATE_LIMIT_LOGIN per account, from any address', async () => {
    const user = await newUser();
    const other = await newUser();
    const check = (who: RegisteredUser, method: 'POST' | 'DELETE', password: string) =>
      t.app.inject({
        method,
        url: method === 'POST' ? '/api/v1/auth/password' : '/api/v1/auth/me',
        remoteAddress: newAddress(),
        headers: who.auth,
        payload: method === 'POST' ? { currentPassword: password, newPassword: 'a new password' } : { password },
      });
    expectProblem(await check(user, 'POST', 'guess one'), 403, 'FORBIDDEN');
    expectProblem(await check(user, 'POST', 'guess two'), 403, 'FORBIDDEN');
    expectProblem(await check(user, 'DELETE', 'guess three'), 403, 'FORBIDDEN');
    // Even the right password: the account is not deleted, and its token still works.
    expectRateLimited(await check(user, 'DELETE', PASSWORD), 15 * 60);
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth })).statusCode).toBe(200);
    // Another account's checks are its own.
    expect((await check(other, 'POST', PASSWORD)).statusCode).toBe(204);
  });

  it('allows RATE_LIMIT_CHAT chats per user a minute, apart from the API limit', async () => {
    const user = await newUser();
    const project = await createProject(t.app, user);
    const chat = (who: RegisteredUser, projectId: string) =>
      t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: who.auth, payload: { message: 'Hi' } });
    expect((await chat(user, project.id)).statusCode).toBe(200);
    expect((await chat(user, project.id)).statusCode).toBe(200);
    expectRateLimited(await chat(user, project.id), 60);
    expect((await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}/messages`, headers: user.auth })).statusCode).toBe(200);
    const other = await newUser();
    expect((await chat(other, (await createProject(t.app, other)).id)).statusCode).toBe(200);
  });

  it('never counts the public operations routes, while the same address is still counted everywhere else', async () => {
    const address = newAddress();
    for (let request = 0; request < 8; request++) {
      for (const url of ['/health/live', '/health', '/metrics']) {
        expect((await t.app.inject({ method: 'GET', url, remoteAddress: address })).statusCode).toBe(200);
      }
    }
    // None of those 24 counted: that address still has all of RATE_LIMIT_API (5) for failed authentication.
    const anonymous = () => t.app.inject({ method: 'GET', url: '/api/v1/projects', remoteAddress: address });
    for (let attempt = 0; attempt < 5; attempt++) expectProblem(await anonymous(), 401, 'UNAUTHORIZED');
    expectRateLimited(await anonymous(), 60);
    // And the probes still answer once it is limited.
    expect((await t.app.inject({ method: 'GET', url: '/health/live', remoteAddress: address })).statusCode).toBe(200);
  });
});

/** Whether a Redis server answers at `url` within a second. */
async function redisAnswers(url: string): Promise<boolean> {
  const redis = new Redis(url, { lazyConnect: true, connectTimeout: 1000, maxRetriesPerRequest: 0, retryStrategy: () => null });
  redis.on('error', () => {});
  try {
    await redis.connect();
    return (await redis.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    redis.disconnect();
  }
}

// Skipped only where no Redis runs and none was asked for; CI sets TEST_REDIS_URL, and there they must run.
const redisUp = await redisAnswers(REDIS_URL);
const skipRedis = !redisUp && !process.env.TEST_REDIS_URL;

describe('counters in Redis (REDIS_URL)', () => {
  /** A key prefix of this run alone, so that runs and instances elsewhere never share its counters. */
  const prefix = `chatbot-test:${randomUUID()}:`;
  const apps: FastifyInstance[] = [];
  const startInstance = async (env: Record<string, string>, logStream?: NodeJS.WritableStream) => {
    const app = await buildApp(testConfig({ ...LIMITS, REDIS_KEY_PREFIX: prefix, ...env }), { database: t.testDb.database, logStream });
    apps.push(app);
    return app;
  };
  afterAll(async () => {
    await Promise.all(apps.map((app) => app.close()));
    if (!redisUp) return;
    const redis = new Redis(REDIS_URL);
    const keys = await redis.keys(`${prefix}*`);
    if (keys.length) await redis.del(...keys);
    redis.disconnect();
  });

  it.skipIf(skipRedis)(
    `two instances sharing Redis stop a login brute force together${skipRedis ? ` (skipped: no Redis answers at ${REDIS_URL})` : ''}`,
    async () => {
      const [first, second] = [await startInstance({ REDIS_URL }), await startInstance({ REDIS_URL })];
      const user = await newUser();
      const address = newAddress();
      expectProblem(await login(first!, address, user.email), 401, 'UNAUTHORIZED');
      expectProblem(await login(second!, address, user.email), 401, 'UNAUTHORIZED');
      expectProblem(await login(first!, address, user.email), 401, 'UNAUTHORIZED');
      expectRateLimited(await login(second!, address, user.email, PASSWORD), 15 * 60);
      expectRateLimited(await login(first!, address, user.email, PASSWORD), 15 * 60);
      // The counters are in Redis under this run's prefix, not in either process.
      const redis = new Redis(REDIS_URL);
      expect(await redis.keys(`${prefix}*`)).not.toEqual([]);
      redis.disconnect();
    },
  );

  /** An instance whose Redis is reached through a relay the test may take down or freeze, and a request of a user's, answered once. */
  async function behindRelay() {
    const proxy = await TcpProxy.start(new URL(REDIS_URL));
    const logs = logCollector();
    const app = await startInstance({ REDIS_URL: `redis://127.0.0.1:${proxy.port}`, LOG_LEVEL: 'info' }, logs.stream);
    const user = await newUser();
    const me = () => app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth });
    expect((await me()).statusCode).toBe(200);
    return { proxy, logs, me };
  }

  it.skipIf(skipRedis)('serves every request while Redis is unreachable (fail open, with a warning) and counts again once it is back', async () => {
    const { proxy, logs, me } = await behindRelay();

    await proxy.stop();
    for (let request = 0; request < 8; request++) expect((await me()).statusCode).toBe(200);
    await waitFor(() => logs.lines.some((line) => line.level === 40 && String(line.msg).includes('Redis is unreachable')));

    await proxy.restart();
    await waitFor(() => logs.lines.some((line) => String(line.msg).includes('Redis is reachable again')));
    const answers = [];
    for (let request = 0; request < 6; request++) answers.push((await me()).statusCode);
    expect(answers).toContain(429);
  });

  it.skipIf(skipRedis)('serves every request while a connected Redis refuses to count, says so once, and counts again once it does', async () => {
    // A Redis that refuses the counters' scripts (out of memory, a replica's READONLY, here its ACL): the
    // connection stays up, so no connection error says anything.
    const admin = new Redis(REDIS_URL);
    const name = `rate-limit-test-${randomUUID()}`;
    await admin.call('ACL', 'SETUSER', name, 'on', '>secret-pass', '~*', '&*', '+@all', '-eval', '-evalsha');
    try {
      const logs = logCollector();
      const url = new URL(REDIS_URL);
      url.username = name;
      url.password = 'secret-pass';
      const app = await startInstance({ REDIS_URL: url.href, LOG_LEVEL: 'info' }, logs.stream);
      const user = await newUser();
      const me = () => app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth });
      for (let request = 0; request < 8; request++) expect((await me()).statusCode).toBe(200);
      const warnings = logs.lines.filter((line) => line.level === 40 && String(line.msg).includes('Redis is unreachable or failing'));
      expect(warnings).toHaveLength(1);
      expect(JSON.stringify(warnings)).toContain('NOPERM');
      expect(JSON.stringify(logs.lines)).not.toContain('secret-pass');

      await admin.call('ACL', 'SETUSER', name, '+eval', '+evalsha');
      // Asked again a few seconds after it failed: then counted, and limited.
      const answers: number[] = [];
      await waitFor(() => answers.includes(429), 15_000, async () => answers.push((await me()).statusCode));
      expect(logs.lines.some((line) => String(line.msg).includes('Redis is reachable again'))).toBe(true);
    } finally {
      await admin.call('ACL', 'DELUSER', name);
      admin.disconnect();
    }
  });

  it.skipIf(skipRedis)('does not hold every request for a Redis that stops answering: it rests from asking it after a failure', async () => {
    const { proxy, logs, me } = await behindRelay();
    proxy.freeze();
    for (let request = 0; request < 6; request++) expect((await me()).statusCode).toBe(200);
    // The first count timed out; the five after it did not ask.
    expect(proxy.heldWrites).toBe(1);
    expect(logs.lines.filter((line) => String(line.msg).includes('Redis is unreachable or failing'))).toHaveLength(1);
    await proxy.stop();
  });

  it.skipIf(skipRedis)("gives back a login's room of its address's failed-login cap when its client leaves while Redis is asked", async () => {
    const { proxy } = await behindRelay();
    proxy.answerDelayMs = 150;
    const app = await startInstance({ REDIS_URL: `redis://127.0.0.1:${proxy.port}`, RATE_LIMIT_LOGIN: '1' });
    await app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = app.server.address() as AddressInfo;
    const users = [await newUser(), await newUser(), await newUser()];
    const signIn = async (user: RegisteredUser) => (await fetch(`http://127.0.0.1:${port}/api/v1/auth/login`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ email: user.email, password: PASSWORD }) })).status;
    // 10 logins (the address's cap of failed logins is 10 × RATE_LIMIT_LOGIN), each of a client gone while
    // the count of its address's failed logins is read from Redis.
    for (let login = 0; login < 10; login++) {
      const body = JSON.stringify({ email: users[0]!.email, password: PASSWORD });
      const socket = connect(port, '127.0.0.1');
      socket.on('error', () => {});
      await once(socket, 'connect');
      socket.write(`POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
      await sleep(30);
      socket.destroy();
    }
    await sleep(1_000); // each of them done with
    // Not one of them failed: the address still has all its room.
    expect([await signIn(users[1]!), await signIn(users[2]!)]).toEqual([200, 200]);
    await proxy.stop();
  });

  it('starts and serves without limits when Redis cannot be reached at all', async () => {
    const logs = logCollector();
    const app = await startInstance({ REDIS_URL: `redis://127.0.0.1:${await freePort()}`, LOG_LEVEL: 'warn' }, logs.stream);
    const user = await newUser();
    for (let request = 0; request < 8; request++) {
      expect((await app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth })).statusCode).toBe(200);
    }
    expect(logs.lines.filter((line) => String(line.msg).includes('Redis is unreachable'))).toHaveLength(1);
  });
  it('keeps the REDIS_URL password out of the log when Redis refuses it', async () => {
    // A Redis that refuses every password, as one does after its password was changed: ioredis's error
    // carries the refused command (HELLO, or AUTH) with its arguments.
    const refusing = createServer((socket) => {
      socket.on('error', () => {});
      socket.on('data', () => socket.write('-WRONGPASS invalid username-password pair or user is disabled.\r\n'));
    });
    refusing.listen(0, '127.0.0.1');
    await once(refusing, 'listening');
    const { port } = refusing.address() as { port: number };
    const password = `redis-password-${randomUUID()}`;
    const logs = logCollector();
    try {
      await startInstance({ REDIS_URL: `redis://:${password}@127.0.0.1:${port}`, LOG_LEVEL: 'info' }, logs.stream);
      await waitFor(() => logs.lines.some((line) => String(line.msg).includes('Redis is unreachable')));
      expect(JSON.stringify(logs.lines)).toContain('WRONGPASS');
      expect(JSON.stringify(logs.lines)).not.toContain(password);
    } finally {
      await apps.pop()?.close();
      refusing.close();
    }
  });
});

/** Until `condition`, running `step` (a wait of 20 ms unless given) between its checks. */
async function waitFor(condition: () => boolean, timeoutMs = 10_000, step: () => Promise<unknown> = () => sleep(20)): Promise<void> {
  const giveUpAt = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > giveUpAt) throw new Error(`not true within ${timeoutMs} ms`);
    await step();
  }
}

/**
 * A TCP relay to a server, which a test can take down (every connection cut) and bring back on the same
 * port, or freeze (connections kept, nothing passed on, as from a server that stopped answering).
 */
class TcpProxy {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  private frozen = false;
  /** What the clients wrote while the relay was frozen: writes held, never passed on. */
  heldWrites = 0;
  /** How long each answer of the server is held before it is passed on (a slow network). */
  answerDelayMs = 0;

  private constructor(
    private readonly target: URL,
    readonly port: number,
  ) {}

  static async start(target: URL): Promise<TcpProxy> {
    const proxy = new TcpProxy(target, await freePort());
    await proxy.restart();
    return proxy;
  }

  async restart(): Promise<void> {
    this.server = createServer((client) => {
      const upstream = connect(Number(this.target.port || 6379), this.target.hostname);
      for (const socket of [client, upstream]) {
        this.sockets.add(socket);
        socket.on('error', () => {});
        socket.on('close', () => this.sockets.delete(socket));
      }
      client.on('data', (data) => {
        if (this.frozen) this.heldWrites++;
        else upstream.write(data);
      });
      upstream.on('data', (data) => {
        if (this.answerDelayMs === 0) client.write(data);
        else setTimeout(() => client.write(data), this.answerDelayMs);
      });
      upstream.on('end', () => client.end());
    });
    this.server.listen(this.port, '127.0.0.1');
    await once(this.server, 'listening');
  }

  freeze(): void {
    this.frozen = true;
  }

  async stop(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise((resolve) => this.server!.close(resolve));
  }
}
