import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { MessageDto } from '../../src/modules/messages/schemas.js';
import { createProject, expectProblem, registerUser, type RegisteredUser, startTestAppWithUpstream, type TestAppWithUpstream } from '../support/app.js';

let t: TestAppWithUpstream;
let user: RegisteredUser;

beforeAll(async () => {
  // Every chat of the test is one user's, all at once: as many slots as that.
  t = await startTestAppWithUpstream({ AI_MODEL: 'gpt-4o-mini', CHAT_CONCURRENCY_PER_USER: String(PARALLEL * (1 + SENDS_PER_KEY)) });
  user = await registerUser(t.app);
});

afterAll(() => t.close());

const PARALLEL = 50;
/** Each key is sent this many times at once. */
const SENDS_PER_KEY = 3;

it('answers 50 parallel chats and 50 keys sent 3 times in parallel on one project: each question once, one provider call per key', async () => {
  const projectId = (await createProject(t.app, user)).id;
  // Answers take a while, so that a key's first request is still running when its copies arrive.
  t.fake.setDefault({ delayMs: 200 });
  const chat = (message: string, key?: string) =>
    t.app.inject({
      method: 'POST',
      url: `/api/v1/projects/${projectId}/chat`,
      headers: { ...user.auth, ...(key ? { 'idempotency-key': key } : {}) },
      payload: { message },
    });

  const questions = Array.from({ length: PARALLEL }, (_, i) => `question ${i}`);
  const keyed = Array.from({ length: PARALLEL }, (_, i) => ({ key: `key-${uuidv7()}`, message: `keyed question ${i}` }));
  const [plain, copies] = await Promise.all([
    Promise.all(questions.map((message) => chat(message))),
    Promise.all(keyed.map(({ key, message }) => Promise.all(Array.from({ length: SENDS_PER_KEY }, () => chat(message, key))))),
  ]);

  // Every plain question answered with its own reply.
  for (const [i, response] of plain.entries()) {
    expect(response.statusCode).toBe(200);
    expect(response.json()).toMatchObject({ userMessage: { content: questions[i] }, assistantMessage: { content: `Echo: ${questions[i]}` } });
  }
  // Per key: one turn; its copies were refused while it ran (409) or, if they came later, replayed it.
  const firstResults = new Map<string, unknown>();
  let conflicts = 0;
  for (const [i, responses] of copies.entries()) {
    const answered = responses.filter((r) => r.statusCode === 200).map((r) => r.json());
    for (const response of responses.filter((r) => r.statusCode !== 200)) {
      expectProblem(response, 409, 'IDEMPOTENCY_CONFLICT');
      conflicts++;
    }
    expect(answered.length).toBeGreaterThanOrEqual(1);
    for (const body of answered) expect(body).toEqual(answered[0]);
    expect(answered[0]).toMatchObject({ userMessage: { content: keyed[i]!.message }, assistantMessage: { content: `Echo: ${keyed[i]!.message}` } });
    firstResults.set(keyed[i]!.key, answered[0]);
  }

  // Sent again once everything is done, every key replays its turn without calling the provider.
  const callsBefore = t.fake.requests.length;
  const replays = await Promise.all(keyed.map(({ key, message }) => chat(message, key)));
  for (const [i, replay] of replays.entries()) expect(replay.json()).toEqual(firstResults.get(keyed[i]!.key));
  expect(t.fake.requests.length).toBe(callsBefore);

  // Exactly one provider call per question, plain or keyed.
  const allQuestions = [...questions, ...keyed.map((k) => k.message)];
  const calls = new Map<string, number>();
  for (const request of t.fake.requests) {
    const sent = request.body.messages as { role: string; content: string }[];
    const question = sent.at(-1)!.content;
    calls.set(question, (calls.get(question) ?? 0) + 1);
  }
  expect(Object.fromEntries(calls)).toEqual(Object.fromEntries(allQuestions.map((q) => [q, 1])));

  // The stored history, walked page by page: each question once, each answered once, nothing else.
  const history = await walkHistory(projectId);
  expect(new Set(history.map((m) => m.id)).size).toBe(history.length);
  expect(history.filter((m) => m.role === 'user').map((m) => m.content).sort()).toEqual([...allQuestions].sort());
  expect(history.filter((m) => m.role === 'assistant').map((m) => m.content).sort()).toEqual(allQuestions.map((q) => `Echo: ${q}`).sort());
  expect(history.every((m) => m.status === 'complete')).toBe(true);
  process.stdout.write(
    `concurrency: ${JSON.stringify({ requests: plain.length + PARALLEL * SENDS_PER_KEY + replays.length, providerCalls: callsBefore, conflicts, stored: history.length })}\n`,
  );
});

async function walkHistory(projectId: string): Promise<MessageDto[]> {
  const all: MessageDto[] = [];
  let cursor: string | null = null;
  do {
    const response = await t.app.inject({
      method: 'GET',
      url: `/api/v1/projects/${projectId}/messages?limit=100${cursor ? `&cursor=${cursor}` : ''}`,
      headers: user.auth,
    });
    expect(response.statusCode).toBe(200);
    const page = response.json() as { data: MessageDto[]; nextCursor: string | null };
    all.push(...page.data);
    cursor = page.nextCursor;
  } while (cursor);
  return all;
}

// Every other write under a project or an account checks its key there (a chat's messages the project,
// a keyed chat's key the account): a create that locked the parent against them, then marked it with its
// new key (migration 0011), deadlocked with another create waiting for the same lock. PostgreSQL broke
// the cycle by failing one create: 500.
it.each([
  ['prompts into a project', (projectId: string, i: number) => ({ url: `/api/v1/projects/${projectId}/prompts`, payload: { title: `p${i}`, content: 'Be brief.' } })],
  ['projects into an account', (_: string, i: number) => ({ url: '/api/v1/projects', payload: { name: `project ${i}` } })],
])('creates %s while chats run under the same parent, each one 201', async (_, create) => {
  t.fake.setDefault({ delayMs: 0 });
  const statuses: number[] = [];
  for (let round = 0; round < 10; round++) {
    const owner = await registerUser(t.app);
    const projectId = (await createProject(t.app, owner)).id;
    const chats = Array.from({ length: 6 }, (_, i) =>
      t.app.inject({
        method: 'POST',
        url: `/api/v1/projects/${projectId}/chat`,
        headers: { ...owner.auth, 'idempotency-key': `key-${uuidv7()}` },
        payload: { message: `chat ${i}` },
      }),
    );
    const creates = Array.from({ length: 6 }, (_, i) => t.app.inject({ method: 'POST', headers: owner.auth, ...create(projectId, i) }));
    const [created] = await Promise.all([Promise.all(creates), Promise.all(chats)]);
    statuses.push(...created.map((response) => response.statusCode));
  }
  expect(statuses.filter((status) => status !== 201)).toEqual([]);
});
