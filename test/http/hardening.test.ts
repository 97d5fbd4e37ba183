import { v7 as uuidv7 } from 'uuid';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { gunzipSync, gzipSync } from 'node:zlib';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { BODY_LIMIT_BYTES, SMALL_BODY_LIMIT_BYTES } from '../../src/http/body-limits.js';
import { ConfigError } from '../../src/config.js';
import {
  createProject,
  createPrompt,
  expectProblem,
  registerUser,
  type RegisteredUser,
  startTestApp,
  startTestAppWithUpstream,
  testConfig,
  type TestAppWithUpstream,
} from '../support/app.js';
import { multipart } from '../support/multipart.js';
import { rawRequest, statusLines } from '../support/raw-http.js';

const ALLOWED_ORIGIN = 'https://app.example.com';

let t: TestAppWithUpstream;
let user: RegisteredUser;
beforeAll(async () => {
  t = await startTestAppWithUpstream({ CORS_ORIGINS: `${ALLOWED_ORIGIN}, http://localhost:5173` });
  user = await registerUser(t.app);
});
afterAll(() => t.close());

describe('security headers', () => {
  /** Helmet's headers that only matter to a page a browser renders. */
  const PAGE_ONLY_HEADERS = [
    'referrer-policy',
    'cross-origin-opener-policy',
    'cross-origin-resource-policy',
    'origin-agent-cluster',
    'x-dns-prefetch-control',
    'x-download-options',
    'x-permitted-cross-domain-policies',
    'x-xss-protection',
  ];

  it("sends an API's security headers on answers and problems alike, not a page's, and no x-powered-by", async () => {
    for (const response of [
      await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth }),
      await t.app.inject({ method: 'GET', url: '/api/v1/auth/me' }),
      await t.app.inject({ method: 'GET', url: '/nowhere' }),
      await t.app.inject({ method: 'GET', url: '/health/live' }),
    ]) {
      expect(response.headers['x-content-type-options']).toBe('nosniff');
      expect(response.headers['strict-transport-security']).toMatch(/max-age=\d+/);
      // A JSON response that a browser renders after all loads nothing and is framed by no one.
      expect(response.headers['content-security-policy']).toBe("default-src 'none'; frame-ancestors 'none'");
      expect(response.headers['x-frame-options']).toBe('DENY');
      expect(response.headers['cache-control']).toBe('no-store');
      // What only an HTML page needs stays off JSON: see src/http/hardening.ts.
      for (const header of PAGE_ONLY_HEADERS) expect(response.headers).not.toHaveProperty(header);
      expect(response.headers).not.toHaveProperty('x-powered-by');
    }
  });

  it("sends a page's security headers (all of helmet's) on the docs UI, which is HTML", async () => {
    const page = await t.app.inject({ method: 'GET', url: '/docs' });
    expect(page.statusCode).toBe(200);
    expect(page.headers['content-type']).toMatch(/^text\/html/);
    expect(page.headers['content-security-policy']).toContain("default-src 'self'");
    expect(page.headers['content-security-policy']).toContain("script-src 'self'");
    expect(page.headers['x-frame-options']).toBe('SAMEORIGIN');
    expect(page.headers['referrer-policy']).toBe('no-referrer');
    expect(page.headers['cross-origin-opener-policy']).toBe('same-origin');
    expect(page.headers['x-content-type-options']).toBe('nosniff');
    expect(page.headers['strict-transport-security']).toMatch(/max-age=\d+/);
    // Only the docs: the route beside them is an API response.
    expect((await t.app.inject({ method: 'GET', url: '/openapi.json' })).headers).not.toHaveProperty('referrer-policy');
  });

  it('refuses a body over the limit with 413 problem+json', async () => {
    const response = await t.app.inject({
      method: 'POST',
      url: '/api/v1/projects',
      headers: { ...user.auth, 'content-type': 'application/json' },
      payload: JSON.stringify({ name: 'x', description: 'y'.repeat(BODY_LIMIT_BYTES) }),
    });
    expectProblem(response, 413, 'PAYLOAD_TOO_LARGE');
  });

  // A client that trickles a body in is held until its last byte: with 1.25 MiB everywhere, 1,200
  // connections to the login route, which takes no account, held a gigabyte for REQUEST_TIMEOUT_MS.
  it('takes the long bodies of prompts and chat on their routes only: any other is refused past 32 KiB, before its bytes', async () => {
    const projectId = (await t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: user.auth, payload: { name: 'limits' } })).json().id;
    const longest = { title: 't', content: '😀'.repeat(50_000) };
    const escaped = JSON.stringify(longest).replace(/\p{Extended_Pictographic}/gu, '\\ud83d\\ude00');
    expect(escaped.length).toBeGreaterThan(SMALL_BODY_LIMIT_BYTES * 10);
    const created = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/prompts`, headers: { ...user.auth, 'content-type': 'application/json' }, payload: escaped });
    expect(created.statusCode).toBe(201);
    const description = JSON.stringify({ description: 'é'.repeat(2000) }).replace(/é/g, '\\u00e9');
    expect((await t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}`, headers: { ...user.auth, 'content-type': 'application/json' }, payload: description })).statusCode).toBe(200);
    const over = JSON.stringify({ name: 'x', description: 'y'.repeat(SMALL_BODY_LIMIT_BYTES) });
    expectProblem(await t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}`, headers: { ...user.auth, 'content-type': 'application/json' }, payload: over }), 413, 'PAYLOAD_TOO_LARGE');

    // Over HTTP, the headers alone: the refusal comes before any byte of the body.
    const address = new URL(await t.app.listen({ port: 0, host: '127.0.0.1' }));
    const socket = connect(Number(address.port), address.hostname);
    let received = '';
    socket.setEncoding('utf8').on('data', (chunk: string) => (received += chunk));
    socket.write(`POST /api/v1/auth/register HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: ${BODY_LIMIT_BYTES}\r\n\r\n`);
    await expect.poll(() => received, { timeout: 5_000 }).toMatch(/^HTTP\/1\.1 413 [^]*"code":"PAYLOAD_TOO_LARGE"/);
    socket.destroy();
  });
});

describe('CORS (CORS_ORIGINS)', () => {
  it('echoes an allowed origin and exposes the headers clients need; never allows credentials', async () => {
    const response = await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: { ...user.auth, origin: ALLOWED_ORIGIN } });
    expect(response.statusCode).toBe(200);
    expect(response.headers['access-control-allow-origin']).toBe(ALLOWED_ORIGIN);
    expect(response.headers.vary).toContain('Origin');
    expect(response.headers['access-control-expose-headers']).toContain('x-request-id');
    expect(response.headers['access-control-expose-headers']).toContain('retry-after');
    expect(response.headers).not.toHaveProperty('access-control-allow-credentials');
  });

  it("lets a browser of an allowed origin read a 201's Location, and a download's ETag and Content-Range", async () => {
    const response = await t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...user.auth, origin: ALLOWED_ORIGIN }, payload: { name: 'located' } });
    expect(response.statusCode).toBe(201);
    expect(response.headers.location).toMatch(/^\/api\/v1\/projects\//);
    // The same list on every answer: downloads are in test/modules/files.test.ts.
    expect(String(response.headers['access-control-expose-headers']).split(', ')).toEqual(expect.arrayContaining(['location', 'etag', 'content-range']));
  });

  it("lets a browser of an allowed origin read the router's own refusal of a malformed path, and no other origin", async () => {
    const response = await t.app.inject({ method: 'GET', url: '/api/v1/projects/%E0', headers: { ...user.auth, origin: ALLOWED_ORIGIN } });
    expectProblem(response, 400, 'VALIDATION_ERROR');
    expect(response.headers['access-control-allow-origin']).toBe(ALLOWED_ORIGIN);
    expect(response.headers.vary).toContain('Origin');
    expect(response.headers['access-control-expose-headers']).toContain('x-request-id');

    const other = await t.app.inject({ method: 'GET', url: '/api/v1/projects/%E0', headers: { ...user.auth, origin: 'https://evil.example.com' } });
    expectProblem(other, 400, 'VALIDATION_ERROR');
    expect(other.headers).not.toHaveProperty('access-control-allow-origin');

    const anyOrigin = await startTestApp({ CORS_ORIGINS: '*' });
    try {
      const open = await anyOrigin.app.inject({ method: 'GET', url: '/api/v1/projects/%E0', headers: { origin: 'https://elsewhere.example.com' } });
      expectProblem(open, 400, 'VALIDATION_ERROR');
      expect(open.headers['access-control-allow-origin']).toBe('*');
      expect(open.headers['access-control-expose-headers']).toContain('x-request-id');
    } finally {
      await anyOrigin.close();
    }
  });

  it('does not allow any other origin', async () => {
    const response = await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: { ...user.auth, origin: 'https://evil.example.com' } });
    expect(response.headers).not.toHaveProperty('access-control-allow-origin');
  });

  it('answers a preflight without a token', async () => {
    const response = await t.app.inject({
      method: 'OPTIONS',
      url: '/api/v1/projects',
      headers: { origin: ALLOWED_ORIGIN, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization, content-type' },
    });
    expect(response.statusCode).toBe(204);
    expect(response.headers['access-control-allow-origin']).toBe(ALLOWED_ORIGIN);
    expect(response.headers['access-control-allow-methods']).toContain('PATCH');
    expect(response.headers['access-control-allow-headers']).toContain('authorization');
    // A script resuming a download sends these.
    const download = await t.app.inject({
      method: 'OPTIONS',
      url: `/api/v1/projects/${uuidv7()}/files/${uuidv7()}/content`,
      headers: { origin: ALLOWED_ORIGIN, 'access-control-request-method': 'GET', 'access-control-request-headers': 'authorization, range, if-range, if-none-match, if-match' },
    });
    expect(download.statusCode).toBe(204);
    expect(String(download.headers['access-control-allow-headers']).split(', ')).toEqual(
      expect.arrayContaining(['authorization', 'range', 'if-range', 'if-none-match', 'if-match']),
    );
  });

  it('is off unless configured, and refuses an origin that is not one', async () => {
    const plain = await startTestApp();
    try {
      const response = await plain.app.inject({ method: 'GET', url: '/health/live', headers: { origin: ALLOWED_ORIGIN } });
      expect(response.headers).not.toHaveProperty('access-control-allow-origin');
    } finally {
      await plain.close();
    }
    expect(() => testConfig({ CORS_ORIGINS: 'app.example.com' })).toThrow(ConfigError);
    expect(() => testConfig({ CORS_ORIGINS: 'https://app.example.com/path' })).toThrow(/CORS_ORIGINS/);
    expect(testConfig({ CORS_ORIGINS: ' https://a.example, * ' }).CORS_ORIGINS).toEqual(['https://a.example', '*']);
  });
});

describe('compression', () => {
  it('compresses a large JSON list for a client that accepts it, and nothing small or unasked', async () => {
    const project = await createProject(t.app, user);
    for (let i = 0; i < 10; i++) await createPrompt(t.app, user, project.id, { content: `You are prompt ${i}. `.repeat(30) });
    const url = `/api/v1/projects/${project.id}/prompts?limit=100`;

    const compressed = await t.app.inject({ method: 'GET', url, headers: { ...user.auth, 'accept-encoding': 'gzip' } });
    expect(compressed.statusCode).toBe(200);
    expect(compressed.headers['content-encoding']).toBe('gzip');
    expect(compressed.headers.vary).toContain('accept-encoding');
    const list = JSON.parse(gunzipSync(compressed.rawPayload).toString('utf8'));
    expect(list.data).toHaveLength(10);
    expect(compressed.rawPayload.length).toBeLessThan(JSON.stringify(list).length / 2);

    const plain = await t.app.inject({ method: 'GET', url, headers: user.auth });
    expect(plain.headers).not.toHaveProperty('content-encoding');
    expect(plain.json()).toEqual(list);

    const small = await t.app.inject({ method: 'GET', url: '/health/live', headers: { 'accept-encoding': 'gzip' } });
    expect(small.headers).not.toHaveProperty('content-encoding');
  });

  it('never compresses a server-sent event stream', async () => {
    const project = await createProject(t.app, user);
    t.fake.enqueue({ content: 'word '.repeat(400) });
    const response = await t.app.inject({
      method: 'POST',
      url: `/api/v1/projects/${project.id}/chat`,
      headers: { ...user.auth, 'accept-encoding': 'gzip, br' },
      payload: { message: 'A long answer, please', stream: true },
    });
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toContain('text/event-stream');
    expect(response.headers).not.toHaveProperty('content-encoding');
    expect(response.body).toContain('event: done');
    expect(response.body.length).toBeGreaterThan(2000);
  });
});

describe('a compressed request body (Content-Encoding)', () => {
  it('is refused 415 with Accept-Encoding: identity before it is read, JSON and uploads alike, and nothing is stored', async () => {
    const project = await createProject(t.app, user);
    const json = { 'content-type': 'application/json', ...user.auth };
    const created = await t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...json, 'content-encoding': 'gzip' }, payload: gzipSync(JSON.stringify({ name: 'Zipped' })) });
    expectProblem(created, 415, 'UNSUPPORTED_MEDIA_TYPE');
    expect(created.headers['accept-encoding']).toBe('identity');
    expect(created.json().detail).toMatch(/Content-Encoding/);

    const form = multipart({ name: 'file', filename: 'notes.txt', type: 'text/plain', content: 'Some notes' });
    const upload = await t.app.inject({
      method: 'POST',
      url: `/api/v1/projects/${project.id}/files`,
      headers: { ...form.headers, 'content-encoding': 'br', ...user.auth },
      payload: form.payload,
    });
    expectProblem(upload, 415, 'UNSUPPORTED_MEDIA_TYPE');

    const projects = await t.app.inject({ method: 'GET', url: '/api/v1/projects?limit=100', headers: user.auth });
    expect(projects.json().data.map((p: { name: string }) => p.name)).not.toContain('Zipped');
    const files = await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}/files`, headers: user.auth });
    expect(files.json().data).toEqual([]);

    // `identity` and empty elements are no coding at all; a GET's header has no body to refer to.
    for (const coding of ['Identity', '', ' ', 'identity, ']) {
      const plain = await t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...json, 'content-encoding': coding }, payload: { name: 'Plain' } });
      expect(plain.statusCode, JSON.stringify(coding)).toBe(201);
    }
    const listed = await t.app.inject({ method: 'POST', url: '/api/v1/projects', headers: { ...json, 'content-encoding': 'identity, gzip' }, payload: { name: 'Zipped' } });
    expectProblem(listed, 415, 'UNSUPPORTED_MEDIA_TYPE');
    const read = await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: { ...user.auth, 'content-encoding': 'gzip' } });
    expect(read.statusCode).toBe(200);
  });

  it('is refused 415 on a DELETE too, which parses the body it is sent anyway; an empty one is no body', async () => {
    const project = await createProject(t.app, user);
    const remove = (payload: Buffer | string) =>
      t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${project.id}`, headers: { ...user.auth, 'content-type': 'application/json', 'content-encoding': 'gzip' }, payload });
    const zipped = await remove(gzipSync('{}'));
    expectProblem(zipped, 415, 'UNSUPPORTED_MEDIA_TYPE');
    expect(zipped.headers['accept-encoding']).toBe('identity');
    expect((await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: user.auth })).statusCode).toBe(200);
    expect((await remove('')).statusCode).toBe(204);
  });
});

describe('load shedding', () => {
  it('answers 503 SERVICE_UNAVAILABLE with Retry-After while the event loop is saturated, but keeps /health/live up', async () => {
    const pressured = await startTestApp({ MAX_EVENT_LOOP_DELAY_MS: '10' });
    // Saturate this process's event loop, as CPU-bound requests would: busy 200 ms at a time, every turn
    // of the loop late, so that each one-second sample of its delay sees it, whatever the sample's phase
    // (one block of 1.5 s, begun as a sample was taken, fell in none, and the test missed its 503).
    let saturating = true;
    const saturate = () => {
      if (!saturating) return;
      const until = Date.now() + 200;
      while (Date.now() < until);
      setImmediate(saturate);
    };
    try {
      saturate();
      const healthAnswered = async (status: number) => {
        for (let attempt = 0; attempt < 60; attempt++) {
          const response = await pressured.app.inject({ method: 'GET', url: '/health' });
          if (response.statusCode === status) return response;
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        return undefined;
      };
      const shed = await healthAnswered(503);
      expect(shed, 'no 503 while the event loop was saturated').toBeDefined();
      const body = expectProblem(shed!, 503, 'SERVICE_UNAVAILABLE');
      expect(body.detail).toMatch(/overloaded/);
      expect(Number(shed!.headers['retry-after'])).toBeGreaterThan(0);
      expect(shed!.headers['x-content-type-options']).toBe('nosniff');
      expect(shed!.headers['x-request-id']).toBeTruthy();
      // Refused before authentication does any work: a request without a token is shed, not 401.
      expectProblem(await pressured.app.inject({ method: 'GET', url: '/api/v1/projects' }), 503, 'SERVICE_UNAVAILABLE');
      expect((await pressured.app.inject({ method: 'GET', url: '/health/live' })).statusCode).toBe(200);
      expect((await pressured.app.inject({ method: 'GET', url: '/metrics' })).statusCode).toBe(200);
      // Once the loop is free again, the next sample lets requests through.
      saturating = false;
      expect(await healthAnswered(200), 'still shedding 3 s after the event loop was freed').toBeDefined();
    } finally {
      saturating = false;
      await pressured.close();
    }
  });
});

describe('a request that trickles in (REQUEST_TIMEOUT_MS)', () => {
  it('is answered 408 problem+json, naming it by its x-request-id and path, and its connection closed once the bound has passed', async () => {
    const slow = await startTestApp({ REQUEST_TIMEOUT_MS: '400' });
    try {
      const address = new URL(await slow.app.listen({ port: 0, host: '127.0.0.1' }));
      const socket = connect(Number(address.port), address.hostname);
      let received = '';
      socket.setEncoding('utf8').on('data', (chunk: string) => (received += chunk));
      const closed = once(socket, 'close');
      const started = Date.now();
      // Headers, then a first byte of a body of 1,000, then nothing.
      socket.write(
        'POST /api/v1/auth/login?from=app HTTP/1.1\r\nhost: localhost\r\nx-request-id: mobile-req-42\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{',
      );
      await closed;

      expect(Date.now() - started).toBeGreaterThanOrEqual(400);
      const [head, body] = received.split('\r\n\r\n');
      expect(head).toMatch(/^HTTP\/1\.1 408 /);
      expect(head).toMatch(/content-type: application\/problem\+json/i);
      // Its headers had arrived: the client's support finds it by the id it sent, as any answer's.
      expect(head).toMatch(/x-request-id: mobile-req-42/i);
      expect(JSON.parse(body!)).toMatchObject({ status: 408, code: 'REQUEST_TIMEOUT', instance: '/api/v1/auth/login', requestId: 'mobile-req-42' });
    } finally {
      await slow.close();
    }
  });
});

// Answered before its body had all come, a request's rest is read and dropped (a client still writing got
// EPIPE from a connection closed under it); too slow to come, it was answered a second time, a 408 under
// a request id of its own, on the connection that carried its 401.
describe('a server stopping (SHUTDOWN_DELAY_MS)', () => {
  it('answers readiness 503 and serves on, each connection, a stream\'s too, closed after its answer', async () => {
    const stopping = new AbortController();
    const app = await buildApp(testConfig({ AI_BASE_URL: t.fake.url }), { database: t.testDb.database, stopping: stopping.signal });
    try {
      const project = await createProject(app, user);
      const ready = await app.inject({ method: 'GET', url: '/health' });
      expect([ready.statusCode, ready.headers.connection]).toEqual([200, 'keep-alive']);

      stopping.abort();
      expectProblem(await app.inject({ method: 'GET', url: '/health' }), 503, 'SERVICE_UNAVAILABLE');
      const read = await app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: user.auth });
      expect([read.statusCode, read.headers.connection]).toEqual([200, 'close']);
      const stream = await app.inject({
        method: 'POST',
        url: `/api/v1/projects/${project.id}/chat`,
        headers: user.auth,
        payload: { message: 'Still there?', stream: true },
      });
      expect([stream.statusCode, stream.headers['content-type'], stream.headers.connection]).toEqual([200, 'text/event-stream; charset=utf-8', 'close']);
      expect(stream.body).toContain('event: done');
    } finally {
      await app.close();
    }
  });
});

describe('a request refused before its body has all come', () => {
  it('is answered once: its rest, read and dropped, too slow to come closes the connection, with no second answer', async () => {
    const slow = await startTestApp({ REQUEST_TIMEOUT_MS: '1000' });
    let trickle: NodeJS.Timeout | undefined;
    try {
      const url = await slow.app.listen({ port: 0, host: '127.0.0.1' });
      const request = rawRequest(url, 'POST', '/api/v1/projects', { authorization: 'Bearer not-a-token', 'content-type': 'application/json', 'content-length': '1000' });
      request.socket.write('{"name":');
      await expect.poll(() => request.received().includes('HTTP/1.1 401 '), { timeout: 5_000 }).toBe(true);
      expect(request.received().toLowerCase()).not.toContain('connection: close');
      trickle = setInterval(() => request.socket.writable && request.socket.write(' '), 100);
      await request.closed;
      expect(statusLines(request.received())).toEqual(['HTTP/1.1 401 ']);
    } finally {
      clearInterval(trickle);
      await slow.close();
    }
  });

  // As a proxy that buffered the body sends it (nginx by default): whole, before it reads the answer.
  // Closed under it, the connection was reset, and the proxy answered its own 502.
  it('reads and drops the rest of a body longer than the route takes, sent whole, and keeps its connection: refused before it, or by its size', async () => {
    const served = await startTestApp();
    try {
      const url = await served.app.listen({ port: 0, host: '127.0.0.1' });
      const body = `{"name":"${'x'.repeat(SMALL_BODY_LIMIT_BYTES * 64)}"}`;
      const chunked = `${Buffer.byteLength(body).toString(16)}\r\n${body}\r\n0\r\n\r\n`;
      for (const [path, authorization, status] of [
        ['/api/v1/projects', 'Bearer not-a-token', 401],
        ['/api/v1/auth/register', '', 413],
      ] as const) {
        for (const [length, sent] of [
          [{ 'content-length': String(Buffer.byteLength(body)) }, body],
          [{ 'transfer-encoding': 'chunked' }, chunked],
        ] as const) {
          const headers: Record<string, string> = { 'content-type': 'application/json', ...length, ...(authorization ? { authorization } : {}) };
          const request = rawRequest(url, 'POST', path, headers);
          request.socket.write(sent);
          await expect.poll(() => request.received().includes(`HTTP/1.1 ${status} `), { timeout: 5_000 }).toBe(true);
          request.socket.write('GET /health/live HTTP/1.1\r\nhost: localhost\r\n\r\n');
          await expect.poll(() => statusLines(request.received()), { timeout: 5_000 }).toEqual([`HTTP/1.1 ${status} `, 'HTTP/1.1 200 ']);
          expect(request.received().toLowerCase()).not.toContain('connection: close');
          request.socket.destroy();
        }
      }
    } finally {
      await served.close();
    }
  });

  it('closes the connection when the rest of a body declared longer than the route takes still comes after a while, with no second answer', async () => {
    // The while: 5 s (or REQUEST_TIMEOUT_MS if shorter; here 300 s, which cannot be what closes it).
    const served = await startTestApp();
    let trickle: NodeJS.Timeout | undefined;
    try {
      const url = await served.app.listen({ port: 0, host: '127.0.0.1' });
      const lengths: Record<string, string>[] = [{ 'content-length': String(SMALL_BODY_LIMIT_BYTES + 1) }, { 'transfer-encoding': 'chunked' }];
      for (const length of lengths) {
        const request = rawRequest(url, 'POST', '/api/v1/projects', { authorization: 'Bearer not-a-token', 'content-type': 'application/json', ...length });
        const chunked = 'transfer-encoding' in length;
        request.socket.write(chunked ? '8\r\n{"name":\r\n' : '{"name":');
        trickle = setInterval(() => request.socket.writable && request.socket.write(chunked ? '1\r\n \r\n' : ' '), 100);
        await expect.poll(() => request.received().includes('HTTP/1.1 401 '), { timeout: 5_000 }).toBe(true);
        // Not closed at the answer: a second of the rest is read (what was closed at once before).
        await sleep(1_000);
        expect(request.socket.destroyed).toBe(false);
        await request.closed;
        clearInterval(trickle);
        expect(statusLines(request.received())).toEqual(['HTTP/1.1 401 ']);
        expect(request.received().toLowerCase()).not.toContain('connection: close');
      }
    } finally {
      clearInterval(trickle);
      await served.close();
    }
  });
});

describe('a client that takes nothing of a large answer (AI_TIMEOUT_MS)', () => {
  it('is disconnected once the bound has passed, a download and a page of JSON alike', async () => {
    const stalling = await startTestApp({ AI_TIMEOUT_MS: '500', FILE_MAX_BYTES: String(64 * 1024 * 1024) });
    const sockets: Socket[] = [];
    try {
      const owner = await registerUser(stalling.app);
      const project = await createProject(stalling.app, owner);
      // Each more than the socket buffers at both ends take (on Linux, up to 4 MB sent and 32 MB received).
      const upload = multipart({ filename: 'big.bin', type: 'application/octet-stream', content: Buffer.alloc(48 * 1024 * 1024) });
      const file = await stalling.app.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/files`, headers: { ...owner.auth, ...upload.headers }, payload: upload.payload });
      expect(file.statusCode).toBe(201);
      // Prompts of 100,000 control characters, each written as a 6-byte escape: a page of 70 is 42 MB.
      for (let i = 0; i < 70; i++) await createPrompt(stalling.app, owner, project.id, { content: '\u0001'.repeat(100_000) });
      const address = new URL(await stalling.app.listen({ port: 0, host: '127.0.0.1' }));
      const connections = () => new Promise<number>((resolve, reject) => stalling.app.server.getConnections((error, count) => (error ? reject(error) : resolve(count))));
      for (const path of [`/api/v1/projects/${project.id}/files/${file.json().id}/content`, `/api/v1/projects/${project.id}/prompts?limit=100`]) {
        const socket = connect(Number(address.port), address.hostname).pause(); // reads nothing
        sockets.push(socket);
        socket.write(`GET ${path} HTTP/1.1\r\nhost: localhost\r\nauthorization: ${owner.auth.authorization}\r\n\r\n`);
      }
      await expect.poll(connections).toBe(2);
      // Without the bound, the server keeps both for as long as the clients do.
      await expect.poll(connections, { timeout: 20_000 }).toBe(0);
    } finally {
      for (const socket of sockets) socket.destroy();
      await stalling.close();
    }
  }, 60_000);
});

describe('what Node would answer by itself, before Fastify sees a request', () => {
  /** What the server answers `request`, written as is on a connection of its own, and the problem it sends. */
  async function exchange(url: string, request: string) {
    const address = new URL(url);
    const socket = connect(Number(address.port), address.hostname);
    let received = '';
    socket.setEncoding('utf8').on('data', (chunk: string) => (received += chunk));
    const closed = once(socket, 'close');
    socket.write(request);
    await closed;
    const [head, body] = received.split('\r\n\r\n');
    // The JSON whether it comes with a length or in chunks.
    return { head: head!, json: JSON.parse(/\{[\s\S]*\}/.exec(body ?? '')?.[0] ?? 'null') as Record<string, unknown> | null };
  }

  it('refuses an HTTP/1.1 request without Host in problem+json with a request id, and serves one that expects what it does not know', async () => {
    const served = await startTestApp();
    try {
      const url = await served.app.listen({ port: 0, host: '127.0.0.1' });
      // A health check written by hand (HAProxy's httpchk without a Host line).
      const noHost = await exchange(url, 'GET /health/live HTTP/1.1\r\nconnection: close\r\n\r\n');
      expect(noHost.head).toMatch(/^HTTP\/1\.1 400 /);
      expect(noHost.head).toMatch(/\r\ncontent-type: application\/problem\+json/i);
      expect(noHost.json).toMatchObject({ status: 400, code: 'VALIDATION_ERROR', errors: [{ path: 'headers.host', message: 'is required' }] });
      expect(noHost.head).toContain(`x-request-id: ${String(noHost.json!.requestId)}`);
      // HTTP/1.0 names no Host.
      expect((await exchange(url, 'GET /health/live HTTP/1.0\r\n\r\n')).head).toMatch(/^HTTP\/1\.1 200 /);
      // RFC 9110 (10.1.1): an expectation the server does not know may be ignored; Node's own 417 had no body.
      const expecting = await exchange(url, 'GET /health/live HTTP/1.1\r\nhost: localhost\r\nexpect: something-else\r\nconnection: close\r\n\r\n');
      expect(expecting.head).toMatch(/^HTTP\/1\.1 200 /);
      expect(expecting.json).toEqual({ status: 'ok' });
      expect(expecting.head).toMatch(/\r\nx-request-id: \S+/i);
    } finally {
      await served.close();
    }
  });
});
