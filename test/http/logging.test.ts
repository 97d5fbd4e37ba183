import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { buildApp } from '../../src/app.js';
import { startTestApp, testConfig, type TestApp } from '../support/app.js';
import { logCollector } from '../support/logs.js';

let t: TestApp;
beforeAll(async () => {
  t = await startTestApp();
});
afterAll(() => t.close());

/** An app logging at `level` into a collector, with a route that logs through `request.log`. */
async function loggingApp(level: string) {
  const logs = logCollector();
  const app = await buildApp(testConfig({ LOG_LEVEL: level }), { database: t.testDb.database, logStream: logs.stream });
  app.get('/log', { config: { public: true } }, async (request) => {
    request.log.debug('a detail');
    request.log.warn({ body: { password: 'hunter2' }, step: 1 }, 'a warning');
    request.log.child({ step: 2 }).warn('from a child');
    return { level: request.log.level };
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

  it("carry it on Fastify's own lines at info, and on a route's own level", async () => {
    const { app, logs } = await loggingApp('info');
    onTestFinished(() => app.close());
    const logged = await app.inject({ method: 'GET', url: '/log', headers: { 'x-request-id': 'trace-info-1' } });
    const verbose = await app.inject({ method: 'GET', url: '/verbose' });
    expect(linesOf(logs, 'trace-info-1').map((line) => line.msg)).toEqual(['incoming request', 'a warning', 'from a child', 'request completed']);
    expect(logged.json()).toEqual({ level: 'info' });
    const requestId = verbose.headers['x-request-id'] as string;
    expect(requestId).toMatch(/^[0-9a-f-]{36}$/);
    expect(linesOf(logs, requestId).map((line) => line.msg)).toEqual(['incoming request', 'a detail', 'request completed']);
  });
});
