import { Agent } from 'node:http';
import { connect } from 'node:net';
import { and, eq, inArray } from 'drizzle-orm';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { openPglite, pgliteFolder } from '../../src/db/database.js';
import { messages } from '../../src/db/schema.js';
import { createProject, expectProblem, registerUser, startTestApp } from '../support/app.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { FakeUpstream } from '../support/fake-upstream.js';
import { send } from '../support/raw-http.js';
import { type ServerProcess, spawnServer, waitUntilServing } from '../support/server-process.js';
import type { SseEvent } from '../support/sse.js';
import { missingWrites, type Outcome, type Session, TrafficClient } from '../support/traffic.js';

// A real server process (tsx compiles, PGlite boots), SIGTERM and a drain of several seconds.
vi.setConfig({ testTimeout: 180_000, hookTimeout: 120_000 });

/** Turns still running 2 s before this bound (6 s after SIGTERM) are interrupted. */
const SHUTDOWN_TIMEOUT_MS = 8_000;
/** The fake upstream answers after 300 ms, then streams one word per 100 ms (its echo of the question). */
const UPSTREAM = { delayMs: 300, chunkDelayMs: 100 };
/** Streams that finish during the drain (about 3 s) and streams that would outlast it (about 20 s). */
const SHORT_QUESTION = 'short '.repeat(30);
const LONG_QUESTION = 'long '.repeat(200);

let fake: FakeUpstream;
let testDb: TestDatabase | undefined;
let server: ServerProcess | undefined;

beforeAll(async () => {
  fake = await FakeUpstream.start();
  fake.setDefault(UPSTREAM);
  // On PostgreSQL the server gets its own throwaway database; on the embedded default, its own folder.
  if (process.env.TEST_DATABASE_URL) testDb = await createTestDatabase();
});

afterAll(async () => {
  if (server?.child.exitCode === null) server.child.kill('SIGKILL');
  await fake.close();
  await testDb?.drop();
});

it('on SIGTERM with 100 requests and 20 streams in flight, stores every acknowledged message, ends every stream with an event and exits 0', async () => {
  server = await spawnServer({
    // As testConfig does for the app in the test process: no rate limits (1,000,000 is the most each
    // takes) and no load shedding, which a shared machine could set off.
    RATE_LIMIT_API: '1000000',
    RATE_LIMIT_CHAT: '1000000',
    RATE_LIMIT_LOGIN: '1000000',
    RATE_LIMIT_REGISTER: '1000000',
    MAX_EVENT_LOOP_DELAY_MS: '0',
    BCRYPT_ROUNDS: '4',
    AI_BASE_URL: fake.url,
    AI_MODEL: 'gpt-4o-mini',
    SHUTDOWN_TIMEOUT_MS: String(SHUTDOWN_TIMEOUT_MS),
    ...(testDb?.url ? { DATABASE_URL: testDb.url } : {}),
  });
  await waitUntilServing(server);
  const outcomes: Outcome[] = [];
  const client = new TrafficClient(server.url, (outcome) => outcomes.push(outcome));
  const sessions: Session[] = [];
  for (let i = 0; i < 4; i++) sessions.push((await client.signUp())!);
  const session = (i: number) => sessions[i % sessions.length]!;

  // 20 streams, each open (its question stored and announced) before anything else happens.
  let opened = 0;
  const streams = Array.from({ length: 20 }, (_, i) =>
    client.chatStream(session(i), i % 2 ? LONG_QUESTION : SHORT_QUESTION, (e) => void (e.event === 'user_message' && opened++)),
  );
  await expect.poll(() => opened, { timeout: 60_000 }).toBe(20);

  // 100 requests at once: JSON chats (each waits 300 ms for its answer), prompts written, history read.
  const firstRequest = outcomes.length;
  const requests = Array.from({ length: 100 }, (_, i) => {
    if (i % 2 === 0) return client.chat(session(i), `question ${i}`);
    if (i % 4 === 1) return client.createPrompt(session(i), `prompt ${i}`);
    return client.readMessages(session(i));
  });
  // SIGTERM once some of the chats are surely in flight: the upstream has them and has not answered.
  const jsonChats = () => fake.requests.filter((r) => r.body.stream !== true);
  await expect.poll(() => jsonChats().length, { timeout: 60_000, interval: 5 }).toBeGreaterThanOrEqual(10);
  const inFlight = jsonChats().filter((r) => !r.answered).length;
  server.child.kill('SIGTERM');

  const streamEvents = await Promise.all(streams);
  await Promise.all(requests);
  expect(await server.exited).toBe(0);

  // Every stream ended with a final event: the short ones finished during the drain, the long ones were
  // interrupted shortly before the bound with a 503 naming their stored question.
  for (const [i, events] of streamEvents.entries()) {
    const last = events.at(-1)!;
    if (i % 2 === 0) {
      expect(last.event, `short stream ${i}`).toBe('done');
    } else {
      const userMessageId = (events[0]!.data.userMessage as { id: string }).id;
      expect(last, `long stream ${i}`).toMatchObject({ event: 'error', data: { status: 503, code: 'SERVICE_UNAVAILABLE', userMessageId } });
    }
  }
  const requestOutcomes = outcomes.slice(firstRequest).filter((o) => o.op !== 'chat stream');
  expect(requestOutcomes).toHaveLength(100);
  // Each request either succeeded or was refused: a 503 problem, or its connection reset before it was taken.
  const refused = (o: Outcome) => (o.status === 503 && o.code === 'SERVICE_UNAVAILABLE') || o.status === 0;
  expect(requestOutcomes.filter((o) => !(o.status >= 200 && o.status < 300) && !refused(o))).toEqual([]);
  const succeeded = requestOutcomes.filter((o) => o.status >= 200 && o.status < 300).length;
  expect(succeeded).toBeGreaterThanOrEqual(inFlight);

  // The database the server used, opened again now that it has exited.
  const database = testDb?.database ?? (await openPglite(pgliteFolder(server.dataDir)));
  try {
    expect(await missingWrites(database.db, client.acknowledged)).toEqual({ users: [], projects: [], prompts: [], messages: [] });
    // An interrupted stream's text so far is kept, as incomplete, exactly as the client received it.
    const interrupted = streamEvents.filter((events) => events.at(-1)!.event === 'error');
    const stored = await database.db
      .select()
      .from(messages)
      .where(inArray(messages.projectId, sessions.map((s) => s.projectId)));
    const incomplete = stored.filter((m) => m.role === 'assistant' && m.status === 'incomplete').map((m) => m.content);
    expect(incomplete.sort()).toEqual(interrupted.map(deltaText).sort());
    expect(incomplete.every((text) => text.length > 0)).toBe(true);
    process.stdout.write(
      `shutdown: ${JSON.stringify({
        requests: requestOutcomes.length,
        succeeded,
        chatsInFlightAtSigterm: inFlight,
        streamsDone: streamEvents.length - interrupted.length,
        streamsInterrupted: interrupted.length,
        writesVerified: Object.values(client.acknowledged).reduce((sum, ids) => sum + ids.size, 0),
      })}\n`,
    );
  } finally {
    if (!testDb) await database.close();
  }
});

it('refuses a request that arrives on an open connection while the app closes with a 503 problem, and closes that connection', async () => {
  const origin = 'https://app.example.com';
  const t = await startTestApp({ AI_BASE_URL: fake.url, CORS_ORIGINS: origin });
  const url = await t.app.listen({ port: 0, host: '127.0.0.1' });
  const user = await registerUser(t.app);
  const { id: projectId } = await createProject(t.app, user);
  // One kept-alive connection: the second request waits on it behind the first, a chat in flight.
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  try {
    fake.enqueue({ delayMs: 2_000 });
    const upstreamCalls = fake.requests.length;
    const chat = send(agent, `${url}/api/v1/projects/${projectId}/chat`, 'POST', { ...user.auth, 'content-type': 'application/json' }, '{"message":"hi"}');
    await fake.waitForRequests(upstreamCalls + 1);
    const closed = t.close();
    const late = send(agent, `${url}/api/v1/projects`, 'GET', { ...user.auth, origin });

    expect((await chat).status).toBe(200);
    const refused = await late;
    expect(refused.status).toBe(503);
    expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
    expect(refused.headers.connection).toBe('close');
    // Refused by the first hook, and still with what every response carries.
    expect(refused.headers['x-request-id']).toBeTruthy();
    expect(refused.headers['x-content-type-options']).toBe('nosniff');
    // And what CORS's hook, which did not run, sets: a browser's script reads the 503 and its Retry-After.
    expect(refused.headers['access-control-allow-origin']).toBe(origin);
    expect(refused.headers['access-control-expose-headers']).toContain('retry-after');
    expect(refused.headers['retry-after']).toBe('1');
    expect(JSON.parse(refused.body)).toMatchObject({ status: 503, code: 'SERVICE_UNAVAILABLE', detail: expect.stringMatching(/shutting down/) });
    await closed;
  } finally {
    agent.destroy();
  }
});

it('answers a JSON chat still waiting for the provider shortly before the bound: 503 naming its question, upstream call aborted', async () => {
  // Turns are interrupted 2 s before the bound: here half a second after the app starts closing.
  const t = await startTestApp({ AI_BASE_URL: fake.url, SHUTDOWN_TIMEOUT_MS: '2500' });
  const user = await registerUser(t.app);
  const { id: projectId } = await createProject(t.app, user);
  fake.enqueue({ fault: 'hang' });
  const upstreamCalls = fake.requests.length;
  const chat = t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: user.auth, payload: { message: 'still there?' } });
  const upstream = await fake.waitForRequests(upstreamCalls + 1);
  const closed = t.app.close();
  try {
    const body = expectProblem(await chat, 503, 'SERVICE_UNAVAILABLE');
    await fake.waitForClientClose(upstream);
    const stored = await t.testDb.database.db.select().from(messages).where(eq(messages.projectId, projectId));
    expect(stored.map((m) => [m.id, m.role, m.content])).toEqual([[body.userMessageId, 'user', 'still there?']]);
  } finally {
    await closed;
    await t.testDb.drop();
  }
});

it("stores a stream's answer as incomplete once interrupted, though its client takes nothing, and queues its error event", async () => {
  // Interrupted half a second after the app starts closing; a client that takes nothing is cut after 15 s.
  const t = await startTestApp({ AI_BASE_URL: fake.url, SHUTDOWN_TIMEOUT_MS: '2500', AI_TIMEOUT_MS: '15000', AI_MAX_OUTPUT_TOKENS: '8000' });
  const { port } = new URL(await t.app.listen({ port: 0, host: '127.0.0.1' }));
  const user = await registerUser(t.app);
  const { id: projectId } = await createProject(t.app, user);
  // 6 MB of deltas: far more than the socket's buffers take.
  fake.enqueue({ content: 'x'.repeat(6 * 1024 * 1024), chunks: 96, chunkDelayMs: 20 });
  const calls = fake.requests.length;
  const socket = connect(Number(port), '127.0.0.1');
  socket.on('error', () => {});
  let received = '';
  socket.on('data', (chunk: Buffer) => (received += chunk.toString('latin1')));
  const body = JSON.stringify({ message: 'A long answer, please', stream: true });
  socket.write(`POST /api/v1/projects/${projectId}/chat HTTP/1.1\r\nhost: localhost\r\n${Object.entries(user.auth).map(([name, value]) => `${name}: ${value}\r\n`).join('')}content-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
  socket.pause();
  await fake.waitForRequests(calls + 1);
  await new Promise((resolve) => setTimeout(resolve, 1_000)); // the buffers full: the turn waits for its client
  const closed = t.app.close();
  try {
    const answers = () => t.testDb.database.db.select().from(messages).where(and(eq(messages.projectId, projectId), eq(messages.role, 'assistant')));
    // Stored once interrupted, not once the stalled client is cut off (15 s) or the bound has passed.
    await expect.poll(async () => (await answers()).map((m) => m.status), { timeout: 5_000 }).toEqual(['incomplete']);
    socket.resume();
    await expect.poll(() => received.includes('event: error'), { timeout: 10_000 }).toBe(true);
    expect(received.slice(received.lastIndexOf('event: error'))).toContain('"code":"SERVICE_UNAVAILABLE"');
  } finally {
    socket.destroy();
    await closed;
    await t.testDb.drop();
  }
});

function deltaText(events: SseEvent[]): string {
  return events
    .filter((e) => e.event === 'delta')
    .map((e) => e.data.content)
    .join('');
}
