import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { createProject, expectProblem, registerUser, type RegisteredUser, startTestAppWithUpstream, type TestAppWithUpstream, testConfig } from '../support/app.js';
import { ShuttingDown } from '../../src/http/errors.js';
import type { ProviderCall } from '../../src/http/metrics.js';
import { meterProviders } from '../../src/providers/metered.js';
import { createProviders } from '../../src/providers/registry.js';
import { logCollector } from '../support/logs.js';
import { seriesValue } from '../support/metrics.js';
import { readSse } from '../support/sse.js';

let t: TestAppWithUpstream;
let baseUrl: string;
let user: RegisteredUser;
beforeAll(async () => {
  t = await startTestAppWithUpstream({ AI_MODEL: 'gpt-4o-mini', AI_MAX_RETRIES: '0' });
  baseUrl = await t.app.listen({ port: 0, host: '127.0.0.1' });
  user = await registerUser(t.app);
});
afterAll(() => t.close());
beforeEach(() => t.fake.reset());

async function scrape(): Promise<string> {
  const response = await t.app.inject({ method: 'GET', url: '/metrics' });
  expect(response.statusCode).toBe(200);
  return response.body;
}


const chat = (projectId: string, stream = false) =>
  t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: user.auth, payload: { message: 'How many tokens?', stream } });

describe('GET /metrics', () => {
  it('answers Prometheus text without a token, with process and event-loop metrics', async () => {
    const response = await t.app.inject({ method: 'GET', url: '/metrics' });
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toMatch(/^text\/plain; version=0\.0\.4/);
    for (const name of [
      'process_cpu_user_seconds_total',
      'process_resident_memory_bytes',
      'nodejs_eventloop_lag_seconds',
      'nodejs_eventloop_lag_p99_seconds',
      'http_request_duration_seconds',
      'ai_provider_request_duration_seconds',
      'ai_provider_tokens_total',
      'ai_provider_errors_total',
      'sse_streams_open',
    ]) {
      expect(response.body, name).toContain(`# TYPE ${name} `);
    }
  });

  it('says at the start in production when /metrics takes no token', async () => {
    const secret = { JWT_SECRET: randomUUID() + randomUUID() };
    for (const [env, warned] of [[{ NODE_ENV: 'production', ...secret }, true], [{ NODE_ENV: 'production', METRICS_TOKEN: `metrics-${randomUUID()}`, ...secret }, false], [{}, false]] as const) {
      const logs = logCollector();
      const app = await buildApp(testConfig({ ...env, LOG_LEVEL: 'warn' }), { database: t.testDb.database, logStream: logs.stream });
      await app.close();
      const lines = logs.lines.filter((line) => String(line.msg).startsWith('GET /metrics takes no token'));
      expect(lines, JSON.stringify(env)).toHaveLength(warned ? 1 : 0);
    }
  });

  it('takes METRICS_TOKEN as a bearer token when it is set, and nothing else: 401 problem otherwise', async () => {
    const token = `metrics-${randomUUID()}`;
    const app = await buildApp(testConfig({ METRICS_TOKEN: token }), { database: t.testDb.database });
    try {
      const scrapeWith = (authorization?: string) => app.inject({ method: 'GET', url: '/metrics', headers: authorization ? { authorization } : {} });
      for (const authorization of [undefined, `Bearer ${token.slice(0, -1)}`, `Bearer ${token}x`, token, `Basic ${token}`, `Bearer ${user.token}`]) {
        const refused = expectProblem(await scrapeWith(authorization), 401, 'UNAUTHORIZED');
        expect(refused.detail).toContain('METRICS_TOKEN');
        expect(JSON.stringify(refused)).not.toContain(token);
      }
      for (const authorization of [`Bearer ${token}`, `bearer ${token}`, `Bearer  ${token} `]) {
        const scraped = await scrapeWith(authorization);
        expect(scraped.statusCode, authorization).toBe(200);
        expect(scraped.body).toContain('# TYPE http_request_duration_seconds ');
      }
      // The document says so: the metrics' own token, and its 401 (the app without one documents neither).
      const documented = (await app.inject({ method: 'GET', url: '/openapi.json' })).json().paths['/metrics'].get;
      expect(documented.security).toEqual([{ metricsToken: [] }]);
      expect(documented.responses['401']).toBeDefined();
      const open = (await t.app.inject({ method: 'GET', url: '/openapi.json' })).json().paths['/metrics'].get;
      expect([open.security, open.responses['401']]).toEqual([[], undefined]);
    } finally {
      await app.close();
    }
  });

  it('counts requests and their duration by method, route template and status', async () => {
    const before = await scrape();
    const health = { method: 'GET', route: '/health', status: '200' };
    for (let request = 0; request < 3; request++) await t.app.inject({ method: 'GET', url: '/health' });
    const unknownProject = randomUUID();
    await t.app.inject({ method: 'GET', url: `/api/v1/projects/${unknownProject}`, headers: user.auth });
    const strangePath = `/no-such-route/${randomUUID()}`;
    await t.app.inject({ method: 'GET', url: strangePath });

    const after = await scrape();
    expect(seriesValue(after, 'http_request_duration_seconds_count', health) - seriesValue(before, 'http_request_duration_seconds_count', health)).toBe(3);
    expect(seriesValue(after, 'http_request_duration_seconds_sum', health)).toBeGreaterThan(0);
    expect(seriesValue(after, 'http_request_duration_seconds_bucket', { ...health, le: '+Inf' })).toBe(seriesValue(after, 'http_request_duration_seconds_count', health));
    expect(seriesValue(after, 'http_request_duration_seconds_count', { route: '/api/v1/projects/:projectId', status: '404' })).toBeGreaterThanOrEqual(1);
    expect(seriesValue(after, 'http_request_duration_seconds_count', { route: 'unmatched', status: '404' })).toBeGreaterThanOrEqual(1);
    // Templates, never URLs: what a client puts in a path does not make new series.
    expect(after).not.toContain(unknownProject);
    expect(after).not.toContain(strangePath);
  });

  it('counts the requests the router refuses, under no route: a malformed path, an over-long parameter', async () => {
    const refused = (text: string, status: string) => seriesValue(text, 'http_request_duration_seconds_count', { route: 'unmatched', status });
    const before = await scrape();
    expect((await t.app.inject({ method: 'GET', url: '/api/v1/projects/%zz', headers: user.auth })).statusCode).toBe(400);
    expect((await t.app.inject({ method: 'GET', url: `/api/v1/projects/${'a'.repeat(200)}`, headers: user.auth })).statusCode).toBe(404);
    const after = await scrape();
    expect(refused(after, '400') - refused(before, '400')).toBe(1);
    expect(refused(after, '404') - refused(before, '404')).toBe(1);
  });

  it('leaves liveness probes out (config `metrics: false`), and only them', async () => {
    const count = (text: string, route: string, method = 'GET') =>
      seriesValue(text, 'http_request_duration_seconds_count', { method, route, status: '200' });
    const before = await scrape();
    for (let request = 0; request < 5; request++) {
      expect((await t.app.inject({ method: 'GET', url: '/health/live' })).statusCode).toBe(200);
      expect((await t.app.inject({ method: 'HEAD', url: '/health/live' })).statusCode).toBe(200);
    }
    // Its neighbour in the same plugin, a route of another module and Fastify's HEAD twin of a GET still count.
    await t.app.inject({ method: 'GET', url: '/health' });
    await t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: user.auth });
    await t.app.inject({ method: 'HEAD', url: '/health' });
    const after = await scrape();
    expect(after).not.toContain('route="/health/live"');
    expect(count(after, '/health') - count(before, '/health')).toBe(1);
    expect(count(after, '/api/v1/auth/me') - count(before, '/api/v1/auth/me')).toBe(1);
    expect(count(after, '/health', 'HEAD') - count(before, '/health', 'HEAD')).toBe(1);
  });

  it('counts provider calls, their tokens and their errors by provider and model', async () => {
    const projectId = (await createProject(t.app, user)).id;
    const labels = { provider: 'openai', model: 'gpt-4o-mini' };
    const before = await scrape();
    t.fake.enqueue({ usage: { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18 } });
    expect((await chat(projectId)).statusCode).toBe(200);
    // PROVIDER_ERRORs an operator puts right different ways: wait, fix the key, pay, look at the upstream.
    // And an answer of no text: a failure, whose tokens the upstream reported (and bills).
    t.fake.enqueue({ status: 500 }, { status: 401 }, { status: 429, errorCode: 'insufficient_quota' }, { fault: 'malformed-json' }, { content: '', usage: { prompt_tokens: 4, completion_tokens: 0, total_tokens: 4 } });
    for (let failed = 0; failed < 5; failed++) expect((await chat(projectId)).statusCode).toBe(502);

    const after = await scrape();
    const delta = (name: string, extra: Record<string, string> = {}) =>
      seriesValue(after, name, { ...labels, ...extra }) - seriesValue(before, name, { ...labels, ...extra });
    expect(delta('ai_provider_tokens_total', { type: 'prompt' })).toBe(15);
    expect(delta('ai_provider_tokens_total', { type: 'completion' })).toBe(7);
    expect(delta('ai_provider_request_duration_seconds_count', { operation: 'complete', outcome: 'ok' })).toBe(1);
    expect(delta('ai_provider_request_duration_seconds_count', { operation: 'complete', outcome: 'error' })).toBe(5);
    for (const reason of ['500', '401', 'quota']) expect(delta('ai_provider_errors_total', { code: 'PROVIDER_ERROR', reason }), reason).toBe(1);
    expect(delta('ai_provider_errors_total', { code: 'PROVIDER_ERROR', reason: 'answer' })).toBe(2);
  });

  // A call that succeeds at its second try was one `ok`, and nothing else: an upstream's early 429s,
  // which come before its outage, could be seen nowhere.
  it('counts and logs each retry of a provider call by its reason: the status, or the connection', async () => {
    const logs = logCollector();
    const app = await buildApp(testConfig({ AI_BASE_URL: t.fake.url, AI_MODEL: 'gpt-4o-mini', AI_MAX_RETRIES: '2', LOG_LEVEL: 'warn' }), {
      database: t.testDb.database,
      logStream: logs.stream,
    });
    try {
      const owner = await registerUser(app);
      const projectId = (await createProject(app, owner)).id;
      const scrapeOf = async () => (await app.inject({ method: 'GET', url: '/metrics' })).body;
      const before = await scrapeOf();
      t.fake.enqueue({ status: 429, retryAfter: 0 }, { fault: 'reset' }, { content: 'at last' });
      const answered = await app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'hi' } });
      expect(answered.statusCode).toBe(200);
      const after = await scrapeOf();
      const delta = (reason: string) => seriesValue(after, 'ai_provider_retries_total', { provider: 'openai', reason }) - seriesValue(before, 'ai_provider_retries_total', { provider: 'openai', reason });
      expect([delta('429'), delta('connection')]).toEqual([1, 1]);
      // On the request's log: the retries of a call the provider bills each try of, told apart by request.
      const reqId = answered.headers['x-request-id'];
      expect(logs.lines.filter((line) => line.msg === 'AI provider call failed; trying it again')).toEqual([
        expect.objectContaining({ level: 40, reqId, provider: 'openai', reason: '429', retry: 1 }),
        expect.objectContaining({ level: 40, reqId, provider: 'openai', reason: 'connection', retry: 2 }),
      ]);
    } finally {
      await app.close();
    }
  });

  it("names a model only when the server knows it: a project's own model name is nobody else's to read", async () => {
    const secret = `acme-confidential-finetune-${randomUUID()}`;
    const known = (await createProject(t.app, user, { model: `${secret}/GPT-4o` })).id;
    const unknown = (await createProject(t.app, user, { model: secret })).id;
    const before = await scrape();
    expect((await chat(known)).statusCode).toBe(200);
    expect((await chat(unknown)).statusCode).toBe(200);
    const after = await scrape();
    expect(after).not.toContain(secret);
    const calls = (model: string) =>
      seriesValue(after, 'ai_provider_request_duration_seconds_count', { provider: 'openai', model, operation: 'complete', outcome: 'ok' }) -
      seriesValue(before, 'ai_provider_request_duration_seconds_count', { provider: 'openai', model, operation: 'complete', outcome: 'ok' });
    expect(calls('gpt-4o')).toBe(1);
    expect(calls('other')).toBe(1);
  });

  it('shows an SSE stream as open while it runs and closed after, with the tokens it used', async () => {
    const projectId = (await createProject(t.app, user)).id;
    const before = await scrape();
    t.fake.enqueue({ content: 'one two three four', chunks: 4, chunkDelayMs: 150, usage: { prompt_tokens: 5, completion_tokens: 4, total_tokens: 9 } });
    const response = await fetch(`${baseUrl}/api/v1/projects/${projectId}/chat`, {
      method: 'POST',
      headers: { ...user.auth, 'content-type': 'application/json' },
      body: JSON.stringify({ message: 'Count to four', stream: true }),
    });
    let openDuringStream: Promise<number> | undefined;
    const events = await readSse(response, (event) => {
      if (event.event === 'delta') openDuringStream ??= scrape().then((text) => seriesValue(text, 'sse_streams_open'));
    });
    expect(events.at(-1)!.event).toBe('done');
    expect(await openDuringStream).toBe(1);
    const after = await scrape();
    expect(seriesValue(after, 'sse_streams_open')).toBe(0);
    const labels = { provider: 'openai', model: 'gpt-4o-mini' };
    expect(seriesValue(after, 'ai_provider_tokens_total', { ...labels, type: 'completion' }) - seriesValue(before, 'ai_provider_tokens_total', { ...labels, type: 'completion' })).toBe(4);
    expect(seriesValue(after, 'ai_provider_request_duration_seconds_count', { ...labels, operation: 'stream', outcome: 'ok' })).toBe(1);
  });

  it('goes back to no open stream when the client leaves mid-stream', async () => {
    const projectId = (await createProject(t.app, user)).id;
    t.fake.enqueue({ content: 'slow words keep coming here', chunks: 5, chunkDelayMs: 300 });
    const controller = new AbortController();
    const response = await fetch(`${baseUrl}/api/v1/projects/${projectId}/chat`, {
      method: 'POST',
      headers: { ...user.auth, 'content-type': 'application/json' },
      body: JSON.stringify({ message: 'Go on', stream: true }),
      signal: controller.signal,
    });
    await readSse(response, (event) => (event.event === 'delta' ? 'stop' : undefined), controller);
    await t.fake.waitForClientClose();
    const giveUpAt = Date.now() + 5_000;
    while (seriesValue(await scrape(), 'sse_streams_open') !== 0 && Date.now() < giveUpAt) await new Promise((resolve) => setTimeout(resolve, 20));
    expect(seriesValue(await scrape(), 'sse_streams_open')).toBe(0);
    expect(seriesValue(await scrape(), 'ai_provider_request_duration_seconds_count', { operation: 'stream', outcome: 'aborted' })).toBe(1);
  });

  // Its response emits neither 'finish' nor 'error', and no onResponse hook ran: such requests were in
  // no count, and no log line told of them.
  it('counts a request whose client leaves before its answer as 499, once, JSON and streamed alike', async () => {
    const projectId = (await createProject(t.app, user)).id;
    const count = async (status: number) =>
      seriesValue(await scrape(), 'http_request_duration_seconds_count', { method: 'POST', route: '/api/v1/projects/:projectId/chat', status: String(status) });
    const before = { gone: await count(499), ok: await count(200) };
    const send = (stream: boolean, signal: AbortSignal) =>
      fetch(`${baseUrl}/api/v1/projects/${projectId}/chat`, {
        method: 'POST',
        headers: { ...user.auth, 'content-type': 'application/json' },
        body: JSON.stringify({ message: 'Go on', stream }),
        signal,
      });
    t.fake.enqueue({ delayMs: 300 }, { content: 'slow words keep coming here', chunks: 5, chunkDelayMs: 300 });
    const json = new AbortController();
    const answered = send(false, json.signal).catch(() => undefined);
    await t.fake.waitForRequests(1);
    json.abort();
    await answered;
    const streamed = new AbortController();
    await readSse(await send(true, streamed.signal), (event) => (event.event === 'delta' ? 'stop' : undefined), streamed);
    // Both turns end on their own: the JSON one stores its answer (for nobody), the stream its text so far.
    await expect.poll(async () => (await t.app.inject({ method: 'GET', url: `/api/v1/projects/${projectId}/messages`, headers: user.auth })).json().data.length).toBe(4);
    await new Promise((resolve) => setTimeout(resolve, 100)); // the JSON turn's answer, written to no one
    expect(await count(499)).toBe(before.gone + 2);
    expect(await count(200)).toBe(before.ok);
  });

  it('counts a stream that failed, before its first delta and after its second, as an error: once each', async () => {
    const projectId = (await createProject(t.app, user)).id;
    const count = async (outcome: string) =>
      seriesValue(await scrape(), 'ai_provider_request_duration_seconds_count', { provider: 'openai', model: 'gpt-4o-mini', operation: 'stream', outcome });
    const failures = async (reason: string) => seriesValue(await scrape(), 'ai_provider_errors_total', { model: 'gpt-4o-mini', reason });
    const before = { error: await count('error'), ok: await count('ok'), aborted: await count('aborted'), 500: await failures('500'), connection: await failures('connection') };
    t.fake.enqueue({ status: 500 });
    t.fake.enqueue({ content: 'first second third', chunks: 3, fault: 'reset', afterChunks: 2 });
    for (const deltas of [[], ['delta', 'delta']]) {
      const response = await fetch(`${baseUrl}/api/v1/projects/${projectId}/chat`, {
        method: 'POST',
        headers: { ...user.auth, 'content-type': 'application/json' },
        body: JSON.stringify({ message: 'Go on', stream: true }),
      });
      expect((await readSse(response)).map((event) => event.event)).toEqual(['user_message', ...deltas, 'error']);
    }
    expect(await count('error')).toBe(before.error + 2);
    expect(await count('ok')).toBe(before.ok);
    expect(await count('aborted')).toBe(before.aborted);
    expect([await failures('500'), await failures('connection')]).toEqual([before[500] + 1, before.connection + 1]);
  });

  // Its headers said 200 before the upstream failed: counted and logged as that 200, a failed stream was
  // in no error rate, and its access line read as a success.
  it("counts and logs a stream that ended with an error event by that event's status, a complete one as 200", async () => {
    const logs = logCollector();
    const app = await buildApp(testConfig({ AI_BASE_URL: t.fake.url, AI_MODEL: 'gpt-4o-mini', AI_MAX_RETRIES: '0', LOG_LEVEL: 'info' }), {
      database: t.testDb.database,
      logStream: logs.stream,
    });
    try {
      const url = await app.listen({ port: 0, host: '127.0.0.1' });
      const projectId = (await createProject(app, user)).id;
      const route = { method: 'POST', route: '/api/v1/projects/:projectId/chat' };
      const count = async (status: number) =>
        seriesValue((await app.inject({ method: 'GET', url: '/metrics' })).body, 'http_request_duration_seconds_count', { ...route, status: String(status) });
      t.fake.enqueue({ content: 'first second third', chunks: 3, fault: 'reset', afterChunks: 2 }, { content: 'all of it' });
      const streamed = async () => {
        const response = await fetch(`${url}/api/v1/projects/${projectId}/chat`, {
          method: 'POST',
          headers: { ...user.auth, 'content-type': 'application/json', 'x-request-id': `stream-${randomUUID()}` },
          body: JSON.stringify({ message: 'Go on', stream: true }),
        });
        expect(response.status).toBe(200);
        return { requestId: response.headers.get('x-request-id')!, last: (await readSse(response)).at(-1)! };
      };
      const failed = await streamed();
      expect(failed.last).toMatchObject({ event: 'error', data: { status: 502, code: 'PROVIDER_ERROR' } });
      const complete = await streamed();
      expect(complete.last.event).toBe('done');
      expect(await count(502)).toBe(1);
      expect(await count(200)).toBe(1);
      const accessLine = (requestId: string) => logs.lines.find((line) => line.reqId === requestId && line.msg === 'request completed');
      await expect.poll(() => accessLine(complete.requestId)).toBeDefined();
      expect(accessLine(failed.requestId)).toMatchObject({ res: { statusCode: 200 }, streamError: { status: 502, code: 'PROVIDER_ERROR' } });
      expect(accessLine(complete.requestId)).not.toHaveProperty('streamError');
    } finally {
      await app.close();
    }
  });

  // Every deploy that interrupted streams counted a provider error for each (ai_provider_errors_total).
  it('counts a call that the shutdown interrupts as aborted, not as a failure of the provider', async () => {
    const calls: ProviderCall[] = [];
    const providers = meterProviders(createProviders(testConfig({ AI_BASE_URL: t.fake.url, AI_MODEL: 'gpt-4o-mini' })), (call) => calls.push(call));
    try {
      const { adapter, model } = providers.resolve(null, null);
      const call = (signal: AbortSignal) => ({ model, messages: [{ role: 'user' as const, content: 'Go on' }], maxOutputTokens: 16, signal, deadline: Date.now() + 10_000 });
      t.fake.enqueue({ content: 'slow words keep coming', chunks: 4, chunkDelayMs: 300 }, { delayMs: 2_000 });
      const streamed = new AbortController();
      const stream = adapter.stream(call(streamed.signal), () => streamed.abort(new ShuttingDown()));
      await expect(stream).rejects.toBeInstanceOf(ShuttingDown);
      const completed = new AbortController();
      const completion = adapter.complete(call(completed.signal));
      await t.fake.waitForRequests(2);
      completed.abort(new ShuttingDown());
      await expect(completion).rejects.toBeInstanceOf(ShuttingDown);
      expect(calls.map(({ operation, outcome }) => [operation, outcome])).toEqual([
        ['stream', 'aborted'],
        ['complete', 'aborted'],
      ]);
    } finally {
      await providers.close();
    }
  });

  it('shows the PostgreSQL pool (embedded PGlite has none)', async () => {
    const text = await scrape();
    if (t.testDb.database.kind === 'postgres') {
      expect(text).toContain('# TYPE db_pool_connections gauge');
      expect(seriesValue(text, 'db_pool_connections', { state: 'idle' }) + seriesValue(text, 'db_pool_connections', { state: 'busy' })).toBeGreaterThan(0);
      expect(text).toMatch(/^db_pool_waiting_queries \d+$/m);
    } else {
      expect(text).not.toContain('db_pool_connections');
    }
  });
});
