import { setTimeout as sleep } from 'node:timers/promises';
import { and, eq, sql } from 'drizzle-orm';
import pg from 'pg';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { buildApp } from '../../src/app.js';
import { openPostgres } from '../../src/db/database.js';
import { idempotencyKeys, messages, prompts, users } from '../../src/db/schema.js';
import { IdempotencyStore, IN_PROGRESS_RETRY_AFTER_SECONDS, requestHash } from '../../src/modules/chat/idempotency.js';
import { flushStatementOn, turnStatementOn } from '../../src/modules/chat/service.js';
import { countTokens, encodingName, MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS } from '../../src/providers/models.js';
import { defaultModelOf } from '../../src/providers/registry.js';
import { createProject, createPrompt, expectProblem, insertMessages, registerUser, type RegisteredUser, revokeTokens, startTestApp, type TestApp, testConfig } from '../support/app.js';
import { refusingWrites } from '../support/database.js';
import { FakeUpstream, UPSTREAM_ERROR_TEXT, type UpstreamReply } from '../support/fake-upstream.js';
import { logCollector } from '../support/logs.js';
import { seriesValue } from '../support/metrics.js';
import { reachableHeapBytes } from '../support/heap.js';
import { readSse, type SseEvent } from '../support/sse.js';

let fake: FakeUpstream;
let t: TestApp;
let baseUrl: string;
let user: RegisteredUser;

beforeAll(async () => {
  fake = await FakeUpstream.start();
  t = await startTestApp({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini', AI_TIMEOUT_MS: '2000', AI_MAX_RETRIES: '2' });
  baseUrl = await t.app.listen({ port: 0, host: '127.0.0.1' });
  user = await registerUser(t.app);
});
afterAll(async () => {
  await t.close();
  await fake.close();
});
beforeEach(() => fake.reset());

const newProject = async (owner: RegisteredUser = user, body: Record<string, unknown> = {}) => (await createProject(t.app, owner, body)).id;
const addPrompt = (projectId: string, content: string) => createPrompt(t.app, user, projectId, { title: content.slice(0, 20), content });

/** Runs `run` while the database refuses the writes (`before insert on messages`, say) of the rows that meet `when`, and nothing else. */
const refusing = (writes: string, when: string, run: () => Promise<void>) => refusingWrites(t.testDb.database.db, writes, run, { when });

/** Runs `run` while the database refuses the project's answers (assistant messages) that also meet `also`, and nothing else. */
const refusingAnswers = (projectId: string, also: string, run: () => Promise<void>) =>
  refusing('before insert on messages', `new.project_id = '${projectId}' and new.role = 'assistant'${also}`, run);

const chat = (projectId: string, payload: object, headers: Record<string, string> = {}, app = t.app) =>
  app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: { ...user.auth, ...headers }, payload });

const stored = (projectId: string, on: TestApp = t) =>
  on.testDb.database.db.select().from(messages).where(eq(messages.projectId, projectId)).orderBy(messages.createdAt, messages.id);

const clearHistory = (projectId: string) => t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}/messages`, headers: user.auth });
const deleteProject = (projectId: string) => t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}`, headers: user.auth });

function streamChat(projectId: string, payload: object, signal?: AbortSignal, headers: Record<string, string> = {}, base = baseUrl) {
  return fetch(`${base}/api/v1/projects/${projectId}/chat`, {
    method: 'POST',
    headers: { ...user.auth, 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ ...payload, stream: true }),
    signal,
  });
}

describe('JSON chat', () => {
  it('answers with both stored messages and sends the provider exactly prompts, history and the new message', async () => {
    const projectId = await newProject();
    await addPrompt(projectId, 'You are terse.');
    await addPrompt(projectId, 'Answer in English.');

    const first = await chat(projectId, { message: 'Hello' });
    expect(first.statusCode).toBe(200);
    const body = first.json();
    expect(body.userMessage).toMatchObject({ projectId, role: 'user', content: 'Hello', status: 'complete', usage: null });
    expect(body.assistantMessage).toMatchObject({ projectId, role: 'assistant', content: 'Echo: Hello', status: 'complete', model: 'gpt-4o-mini' });
    expect(body.usage).toEqual({ promptTokens: expect.any(Number), completionTokens: expect.any(Number), totalTokens: expect.any(Number) });
    expect(body.assistantMessage.usage).toEqual(body.usage);

    const second = await chat(projectId, { message: 'And again' });
    expect(second.statusCode).toBe(200);
    expect(fake.requests).toHaveLength(2);
    expect(fake.requests[1]!.path).toBe('/v1/chat/completions');
    expect(fake.requests[1]!.body).toMatchObject({ model: 'gpt-4o-mini', max_tokens: 1024 });
    expect(fake.requests[1]!.body.messages).toEqual([
      { role: 'system', content: 'You are terse.' },
      { role: 'system', content: 'Answer in English.' },
      { role: 'user', content: 'Hello' },
      { role: 'assistant', content: 'Echo: Hello' },
      { role: 'user', content: 'And again' },
    ]);

    const rows = await stored(projectId);
    expect(rows.map((r) => [r.role, r.content])).toEqual([
      ['user', 'Hello'],
      ['assistant', 'Echo: Hello'],
      ['user', 'And again'],
      ['assistant', 'Echo: And again'],
    ]);
    const history = await t.app.inject({ method: 'GET', url: `/api/v1/projects/${projectId}/messages`, headers: user.auth });
    expect(history.json().data.map((m: { id: string }) => m.id)).toEqual(rows.map((r) => r.id));
  });

  it("uses the project's own model, switching with no restart", async () => {
    const projectId = await newProject(user, { model: 'my-local-model' });
    expect((await chat(projectId, { message: 'hi' })).json().assistantMessage.model).toBe('my-local-model');
    await t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}`, headers: user.auth, payload: { model: 'other-model' } });
    expect((await chat(projectId, { message: 'hi' })).statusCode).toBe(200);
    expect(fake.requests.map((r) => r.body.model)).toEqual(['my-local-model', 'other-model']);
  });

  it('answers 503 PROVIDER_NOT_CONFIGURED for a provider with no key, naming what configures it, storing nothing', async () => {
    const projectId = await newProject(user, { provider: 'openrouter' });
    const refused = expectProblem(await chat(projectId, { message: 'hi' }), 503, 'PROVIDER_NOT_CONFIGURED');
    expect(refused.detail).toContain('OPENROUTER_API_KEY');
    expect(await stored(projectId)).toHaveLength(0);
    expect(fake.requests).toHaveLength(0);
  });

  it("refuses to start with a reply's budget that leaves the default model no room for a message", async () => {
    const config = testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'llama3.2', AI_MAX_OUTPUT_TOKENS: '16384' });
    await expect(buildApp(config, { database: t.testDb.database })).rejects.toThrow(
      "Invalid configuration: AI_MAX_OUTPUT_TOKENS (16384) leaves no room for a message in the 16000 tokens of llama3.2's context (the model's known window, at most AI_CONTEXT_TOKENS; else AI_CONTEXT_TOKENS, else 16000)",
    );
    // One that leaves room starts.
    const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'llama3.2', AI_MAX_OUTPUT_TOKENS: '15000' }), { database: t.testDb.database });
    await app.close();
  });

  // Set for the default model, AI_CONTEXT_TOKENS was the window of every model: a project's gpt-4 was sent
  // past its 8,192 tokens, and each such turn refused upstream.
  it("fits a project's model of a known window into that window, whatever a larger AI_CONTEXT_TOKENS says", async () => {
    const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'llama3.2', AI_CONTEXT_TOKENS: '20000' }), { database: t.testDb.database });
    try {
      const owner = await registerUser(app);
      const chatIn = async (projectId: string) => app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'hi' } });
      const content = 'word '.repeat(9_000);
      const [gpt4, local] = [(await createProject(app, owner, { model: 'gpt-4' })).id, (await createProject(app, owner)).id];
      for (const projectId of [gpt4, local]) await createPrompt(app, owner, projectId, { title: 'long', content });
      const refused = expectProblem(await chatIn(gpt4), 400, 'CONTEXT_TOO_LONG');
      expect(refused.detail).toContain(`the budget for gpt-4 is ${8_192 - 1_024 - REPLY_PRIMING_TOKENS}`);
      expect(fake.requests).toHaveLength(0);
      // The default model, of no known window: AI_CONTEXT_TOKENS is its window.
      expect((await chatIn(local)).statusCode).toBe(200);
    } finally {
      await app.close();
    }
  });

  it('says at the start, once, when the default provider is not configured', async () => {
    for (const [env, warned] of [[{}, true], [{ AI_BASE_URL: fake.url }, false]] as const) {
      const logs = logCollector();
      const app = await buildApp(testConfig({ ...env, LOG_LEVEL: 'warn' }), { database: t.testDb.database, logStream: logs.stream });
      await app.close();
      const lines = logs.lines.filter((line) => String(line.msg).startsWith('No AI provider is configured (AI_PROVIDER=openai)'));
      expect(lines.map((line) => line.msg), JSON.stringify(env)).toEqual(warned ? [expect.stringContaining('until OPENAI_API_KEY, or AI_BASE_URL')] : []);
    }
  });

  it.each([
    ['an empty message', { message: '' }],
    ['a message over 100,000 characters', { message: 'x'.repeat(100_001) }],
    ['no message', {}],
    ['an unknown property', { message: 'hi', role: 'system' }],
    ['a non-boolean stream', { message: 'hi', stream: 'yes' }],
  ])('refuses %s with 400 and stores nothing', async (_, payload) => {
    const projectId = await newProject();
    expectProblem(await chat(projectId, payload), 400, 'VALIDATION_ERROR');
    expect(await stored(projectId)).toHaveLength(0);
    expect(fake.requests).toHaveLength(0);
  });

  it("is 404 on another user's project and on a malformed id", async () => {
    const other = await registerUser(t.app);
    const theirs = await newProject(other);
    expectProblem(await chat(theirs, { message: 'hi' }), 404, 'NOT_FOUND');
    expectProblem(await chat('not-a-uuid', { message: 'hi' }), 404, 'NOT_FOUND');
    expectProblem(await chat(uuidv7(), { message: 'hi' }), 404, 'NOT_FOUND');
    expect(await stored(theirs)).toHaveLength(0);
    expect(fake.requests).toHaveLength(0);
  });
});

describe('the question stored with the read', () => {
  // A project on the default provider and model, no idempotency key: the turn's read stores the question
  // when nothing can refuse the turn, so these refusals are checked against that statement.
  it('stores nothing for a revoked token or a deleted user (401)', async () => {
    for (const refuse of ['revoke', 'delete'] as const) {
      const owner = await registerUser(t.app);
      const projectId = await newProject(owner);
      if (refuse === 'revoke') await revokeTokens(t.app, owner);
      else await t.testDb.database.db.delete(users).where(eq(users.id, owner.id));
      const refused = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'hi' } });
      expectProblem(refused, 401, 'UNAUTHORIZED');
      expect(await stored(projectId)).toHaveLength(0);
    }
    expect(fake.requests).toHaveLength(0);
  });

  it('answers with the question as stored: a lone surrogate as U+FFFD, the project id as the database has it', async () => {
    const projectId = await newProject();
    for (const headers of [{}, { 'idempotency-key': `key-${uuidv7()}` }] as Record<string, string>[]) {
      const answered = await chat(projectId.toUpperCase(), { message: 'x\udfffy' }, headers);
      expect(answered.statusCode).toBe(200);
      const { userMessage, assistantMessage } = answered.json();
      expect([userMessage.content, userMessage.projectId, assistantMessage.projectId]).toEqual(['x\ufffdy', projectId, projectId]);
    }
    expect((await stored(projectId)).filter((row) => row.role === 'user').map((row) => row.content)).toEqual(['x\ufffdy', 'x\ufffdy']);
  });

  it("makes a streamed question durable on the read's own connection and gives that back, whatever the turn", async () => {
    // More refused streamed turns than the test pool has connections (10): one kept would starve the next.
    for (let i = 0; i < 12; i++) {
      const refused = await streamChat(uuidv7(), { message: 'nobody' });
      expect(refused.status).toBe(404);
      await refused.arrayBuffer();
    }
    // The first stores its question with the read; the second, of a model of its own, after it.
    for (const projectId of [await newProject(), await newProject(user, { model: 'gpt-4' })]) {
      const events = await readSse(await streamChat(projectId, { message: 'durable' }));
      expect([events[0]!.event, events.at(-1)!.event]).toEqual(['user_message', 'done']);
      expect((await stored(projectId)).map((row) => [row.role, row.status])).toEqual([
        ['user', 'complete'],
        ['assistant', 'complete'],
      ]);
    }
    const { poolStats } = t.testDb.database;
    if (poolStats) await expect.poll(() => poolStats().total - poolStats().idle).toBe(0);
  });

  it('writes to the log to make a question durable only when it is stored: a refused turn costs no disk write', async () => {
    const projectId = await newProject();
    expect((await chat(projectId, { message: 'kept' })).statusCode).toBe(200);
    const [question] = await stored(projectId);
    const held = await t.testDb.database.hold();
    const flush = flushStatementOn(held.db);
    // A transaction that wrote to the log has a transaction id; one that did not commits without a flush.
    const writes = async (questionId: string) => {
      await held.db.execute(sql`begin`);
      try {
        await flush.execute({ questionId });
        const result = (await held.db.execute(sql`select pg_current_xact_id_if_assigned() is not null as wrote`)) as unknown as { rows: { wrote: boolean }[] };
        return result.rows[0]!.wrote;
      } finally {
        await held.db.execute(sql`rollback`);
      }
    };
    try {
      expect(await writes(question!.id)).toBe(true);
      expect(await writes(uuidv7())).toBe(false);
    } finally {
      held.release();
    }
  });

  it("checks a project's own model first: its encoding for the question, its window for the budget", async () => {
    const projectId = await newProject(user, { model: 'gpt-4' }); // cl100k_base, 8,192 tokens
    expectProblem(await chat(projectId, { message: 'word '.repeat(9_000) }), 400, 'CONTEXT_TOO_LONG');
    expect(await stored(projectId)).toHaveLength(0);
    expect((await chat(projectId, { message: 'Hello there' })).statusCode).toBe(200);
    const [question] = await stored(projectId);
    expect([question!.tokens, question!.tokenEncoding]).toEqual([countTokens('Hello there', 'gpt-4'), 'cl100k_base']);
  });

});

describe('context budget', () => {
  // A budget of 197 tokens (300, less 100 for the reply and 3 that prime it).
  let budgeted: TestApp;
  let owner: RegisteredUser;
  beforeAll(async () => {
    budgeted = await startTestApp({ AI_BASE_URL: fake.url, AI_CONTEXT_TOKENS: '300', AI_MAX_OUTPUT_TOKENS: '100' });
    owner = await registerUser(budgeted.app);
  });
  afterAll(() => budgeted.close());

  /** A project there with one short prompt. */
  async function briefProject(): Promise<string> {
    const projectId = (await createProject(budgeted.app, owner)).id;
    await createPrompt(budgeted.app, owner, projectId, { title: 'p', content: 'Be brief.' });
    return projectId;
  }
  const send = (projectId: string, message: string) =>
    budgeted.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message } });
  const storedThere = (projectId: string) =>
    budgeted.testDb.database.db.select().from(messages).where(eq(messages.projectId, projectId)).orderBy(messages.createdAt, messages.id);

  it('leaves out the oldest history first and never the prompts or the new message', async () => {
    const projectId = await briefProject();
    for (let i = 0; i < 12; i++) {
      expect((await send(projectId, `Question number ${i} with some words to take up space in the context window`)).statusCode).toBe(200);
    }
    const sent = fake.requests.at(-1)!.body.messages as { role: string; content: string }[];
    expect(sent[0]).toEqual({ role: 'system', content: 'Be brief.' });
    expect(sent.at(-1)).toEqual({ role: 'user', content: expect.stringContaining('Question number 11') });
    const history = sent.slice(1, -1);
    expect(history.length).toBeGreaterThan(0);
    expect(history.length).toBeLessThan(22);
    // What is kept is the newest, contiguous end of the history, oldest first.
    expect(history.at(-1)).toEqual({ role: 'assistant', content: expect.stringContaining('Question number 10') });
    expect(history.some((m) => m.content.includes('Question number 0 '))).toBe(false);

    expectProblem(await send(projectId, 'word '.repeat(400)), 400, 'CONTEXT_TOO_LONG');
    expect(fake.requests).toHaveLength(12);
    expect(await storedThere(projectId)).toHaveLength(24);
  });

  // A prompt's count is kept from one turn to the next (counting all of a project's long prompts every
  // turn held the event loop for seconds); a changed prompt is counted again.
  it('counts a prompt again once it is changed', async () => {
    const projectId = (await createProject(budgeted.app, owner)).id;
    const prompt = await createPrompt(budgeted.app, owner, projectId, { title: 'p', content: 'word '.repeat(150) });
    const edit = (content: string) =>
      budgeted.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}/prompts/${prompt.id}`, headers: owner.auth, payload: { content } });
    expect((await send(projectId, 'hi')).statusCode).toBe(200);
    expect((await edit('word '.repeat(250))).statusCode).toBe(200);
    expectProblem(await send(projectId, 'hi'), 400, 'CONTEXT_TOO_LONG');
    expect((await edit('word '.repeat(100))).statusCode).toBe(200);
    expect((await send(projectId, 'hi')).statusCode).toBe(200);
  });

  it('counts a prompt again once it is changed, even within the millisecond of its last change on the clock of the instance', async () => {
    const projectId = (await createProject(budgeted.app, owner)).id;
    const prompt = await createPrompt(budgeted.app, owner, projectId, { title: 'p', content: 'Be brief.' });
    const edit = (content: string) =>
      budgeted.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}/prompts/${prompt.id}`, headers: owner.auth, payload: { content } });
    // Two versions of one length: the first fits the budget of 197, the second alone does not.
    const fits = 'word '.repeat(150);
    const overflows = '😀 '.repeat(250);
    expect(overflows.length).toBe(fits.length);
    expect(countTokens(overflows, 'gpt-4o-mini')).toBeGreaterThan(197);
    // The instance's clock stands still: two clients saving at once, or a clock set back.
    vi.useFakeTimers({ toFake: ['Date'], now: Date.now() });
    try {
      expect((await edit(fits)).statusCode).toBe(200);
      expect((await send(projectId, 'hi')).statusCode).toBe(200);
      expect((await edit(overflows)).statusCode).toBe(200);
    } finally {
      vi.useRealTimers();
    }
    const calls = fake.requests.length;
    expectProblem(await send(projectId, 'hi'), 400, 'CONTEXT_TOO_LONG');
    expect(fake.requests).toHaveLength(calls);
  });

  // A project's prompts may hold megabytes (MAX_PROMPTS_PER_PROJECT of 100,000 characters), all of them
  // read and parsed by every turn, refused ones included, until their counts were stored.
  it('stores a prompt’s count with the turn that counts it, and forgets it when its content changes', async () => {
    const projectId = (await createProject(budgeted.app, owner)).id;
    const long = 'word '.repeat(250);
    const prompt = await createPrompt(budgeted.app, owner, projectId, { title: 'p', content: long });
    const row = () => budgeted.testDb.database.db.select({ tokens: prompts.tokens, encoding: prompts.tokenEncoding }).from(prompts).where(eq(prompts.id, prompt.id));
    expect(await row()).toEqual([{ tokens: null, encoding: null }]);
    const tokens = countTokens(long, 'gpt-4o-mini');
    const refusal = `The prompts and the message need at least ${MESSAGE_OVERHEAD_TOKENS * 2 + tokens + 1} tokens; the budget for gpt-4o-mini is 197`;
    const refused = await send(projectId, 'hi');
    expectProblem(refused, 400, 'CONTEXT_TOO_LONG');
    expect(refused.json().detail).toBe(refusal);
    expect(await row()).toEqual([{ tokens, encoding: 'o200k_base' }]);

    expect(fake.requests).toHaveLength(0);

    // A change of its content forgets the count, however it is made: through the API, or behind this
    // service's back (an instance of before the count, during a rolling deploy; an edit by hand). The
    // next turn counts the prompt as it now is.
    const patch = (payload: object) => budgeted.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}/prompts/${prompt.id}`, headers: owner.auth, payload });
    const edit = (content: string) => patch({ content });
    const byHand = (content: string) => budgeted.testDb.database.db.update(prompts).set({ content }).where(eq(prompts.id, prompt.id));
    for (const [content, change] of [['Be brief.', edit], ['Be very brief.', byHand]] as const) {
      await change(content);
      expect(await row()).toEqual([{ tokens: null, encoding: null }]);
      expect((await send(projectId, 'hi')).statusCode).toBe(200);
      expect(await row()).toEqual([{ tokens: countTokens(content, 'gpt-4o-mini'), encoding: 'o200k_base' }]);
    }
    // A change of its title alone, or to the same content, keeps it.
    await patch({ title: 'q' });
    await edit('Be very brief.');
    expect(await row()).toEqual([{ tokens: countTokens('Be very brief.', 'gpt-4o-mini'), encoding: 'o200k_base' }]);
  });

  it('reads no prompt of a project of the default model whose stored counts alone pass what the question leaves of its budget', async () => {
    const read = turnStatementOn(budgeted.testDb.database.db);
    const readWith = async (projectId: string, promptsCap: number | null) => {
      const params = { userId: owner.id, projectId, tokenVersion: 0, questionId: uuidv7(), text: 'x', tokens: null, encoding: null, promptsRoom: -1 };
      const [row] = await read.execute({ ...params, defaultEncoding: 'o200k_base', promptsCap });
      return { prompts: row!.prompts?.map((prompt) => prompt.content) ?? null, storedPromptTokens: row!.storedPromptTokens };
    };
    const counted = async (project: Record<string, unknown>) => {
      const projectId = (await createProject(budgeted.app, owner, project)).id;
      await createPrompt(budgeted.app, owner, projectId, { title: 'p', content: 'Be brief.' });
      expect((await send(projectId, 'hi')).statusCode).toBe(200);
      return projectId;
    };
    const stored = MESSAGE_OVERHEAD_TOKENS + countTokens('Be brief.', 'gpt-4o-mini');
    const ofDefault = await counted({});
    expect(await readWith(ofDefault, stored)).toEqual({ prompts: ['Be brief.'], storedPromptTokens: stored });
    expect(await readWith(ofDefault, stored - 1)).toEqual({ prompts: null, storedPromptTokens: stored });
    expect(await readWith(ofDefault, null)).toEqual({ prompts: ['Be brief.'], storedPromptTokens: stored });
    // A project of its own model, whose budget the statement does not know, is read whatever its counts.
    const ofItsOwn = await counted({ model: 'gpt-4o' });
    expect(await readWith(ofItsOwn, stored - 1)).toEqual({ prompts: ['Be brief.'], storedPromptTokens: stored });
  });

  it('reads and counts the prompts of a project of its own model, in that model’s encoding', async () => {
    const projectId = (await createProject(budgeted.app, owner, { model: 'gpt-4' })).id;
    const content = 'Be brief, and answer in German.';
    const prompt = await createPrompt(budgeted.app, owner, projectId, { title: 'p', content });
    expect((await send(projectId, 'hi')).statusCode).toBe(200);
    expect((fake.requests[0]!.body.messages as unknown[])[0]).toEqual({ role: 'system', content });
    const [row] = await budgeted.testDb.database.db.select().from(prompts).where(eq(prompts.id, prompt.id));
    expect([row!.tokens, row!.tokenEncoding]).toEqual([countTokens(content, 'gpt-4'), 'cl100k_base']);
  });

  it('stores a question that fits only by its tokens (not a token a byte) once the turn is checked, counted for the model', async () => {
    const projectId = await briefProject();
    // 130 bytes: within the budget even a token a byte (the turn's read stores it); 500 bytes: only by its 100 tokens.
    const short = 'word '.repeat(26);
    const long = 'word '.repeat(100);
    for (const message of [short, long]) expect((await send(projectId, message)).statusCode).toBe(200);
    const rows = await storedThere(projectId);
    expect(rows.map((row) => [row.role, row.content, row.tokens, row.tokenEncoding])).toEqual([
      ['user', short, countTokens(short, 'gpt-4o-mini'), 'o200k_base'],
      ['assistant', `Echo: ${short}`, expect.any(Number), 'o200k_base'],
      ['user', long, countTokens(long, 'gpt-4o-mini'), 'o200k_base'],
      ['assistant', `Echo: ${long}`, expect.any(Number), 'o200k_base'],
    ]);
    // Past the budget by its tokens too: refused, and nothing more stored.
    expectProblem(await send(projectId, 'word '.repeat(190)), 400, 'CONTEXT_TOO_LONG');
    expect(await storedThere(projectId)).toHaveLength(4);
  });
});

describe('a question the read stores is never refused after', () => {
  // A budget of 526 tokens (629, less 100 for the reply and 3 that prime it). U+2A6D6 is four bytes and
  // four tokens, and a run of more than 128 of them is counted in slices, a token more each: 129 of them
  // are 516 bytes and 519 tokens. Counted a token a byte, such a question (or prompt) passed the read's
  // check, was stored, and was then refused with 400 by its count: stored as complete, named by nothing,
  // and sent upstream with the next turn's history.
  let budgeted: TestApp;
  let owner: RegisteredUser;
  beforeAll(async () => {
    budgeted = await startTestApp({ AI_BASE_URL: fake.url, AI_CONTEXT_TOKENS: '629', AI_MAX_OUTPUT_TOKENS: '100' });
    owner = await registerUser(budgeted.app);
  });
  afterAll(() => budgeted.close());
  const run = String.fromCodePoint(0x2a6d6).repeat(129);

  it.each([
    ['the question', 'x', run],
    ['a prompt', run, 'x'],
  ])('stores nothing when %s is a run of characters of a token a byte, counted in slices past the budget', async (_, prompt, question) => {
    expect([Buffer.byteLength(run), countTokens(run, defaultModelOf(budgeted.config))]).toEqual([516, 519]);
    const projectId = (await createProject(budgeted.app, owner)).id;
    await createPrompt(budgeted.app, owner, projectId, { title: 'p', content: prompt });
    const send = () => budgeted.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: question } });
    const refused = await send();
    expectProblem(refused, 400, 'CONTEXT_TOO_LONG');
    expect(refused.json().userMessageId).toBeUndefined();
    expect(await budgeted.testDb.database.db.select().from(messages).where(eq(messages.projectId, projectId))).toEqual([]);
    expect(fake.requests).toHaveLength(0);
  });
});

describe('stored token counts and long histories', () => {
  const sentHistory = () => (fake.requests.at(-1)!.body.messages as { content: string }[]).slice(0, -1).map((m) => m.content);

  it('stores each message with its token count in the model’s encoding', async () => {
    const projectId = await newProject();
    expect((await chat(projectId, { message: 'How many tokens is this question?' })).statusCode).toBe(200);
    const rows = await stored(projectId);
    expect(rows.map((row) => [row.role, row.tokens, row.tokenEncoding])).toEqual([
      ['user', countTokens('How many tokens is this question?', 'gpt-4o-mini'), 'o200k_base'],
      ['assistant', countTokens(rows[1]!.content, 'gpt-4o-mini'), 'o200k_base'],
    ]);
  });

  it('counts a long question and a long reply in turns, to the same counts, streamed or not', async () => {
    const projectId = await newProject();
    const long = 'Lorem ipsum dolor sit amet, 中文 and 😀.\n'.repeat(1_000);
    expect((await chat(projectId, { message: long })).statusCode).toBe(200);
    const events = await readSse(await streamChat(projectId, { message: `${long}again` }));
    expect(events.map((event) => event.event)).toContain('done');
    const rows = await stored(projectId);
    expect(rows.map((row) => [row.role, row.content.length >= long.length, row.tokens])).toEqual(
      rows.map((row) => [row.role, true, countTokens(row.content, 'gpt-4o-mini')]),
    );
    expect(rows.map((row) => row.role)).toEqual(['user', 'assistant', 'user', 'assistant']);
  });

  it('trusts a stored count only in the model’s own encoding, and counts a message stored without one', async () => {
    const budgeted = await startTestApp({ AI_BASE_URL: fake.url, AI_CONTEXT_TOKENS: '1000', AI_MAX_OUTPUT_TOKENS: '100' });
    try {
      const owner = await registerUser(budgeted.app);
      const projectId = (await createProject(budgeted.app, owner, { model: 'gpt-4o-mini' })).id;
      const { db } = budgeted.testDb.database;
      // Far over the budget if believed: the first is left out with all older history (and the answer
      // after it, whose question it is); the others are counted anew.
      const stored = [
        { role: 'user', content: 'oldest, counted anew', tokens: null, tokenEncoding: null },
        { role: 'assistant', content: 'counted in another encoding', tokens: 5000, tokenEncoding: 'cl100k_base' },
        { role: 'user', content: 'believed to be huge', tokens: 5000, tokenEncoding: 'o200k_base' },
        { role: 'assistant', content: 'its answer', tokens: null, tokenEncoding: null },
        { role: 'user', content: 'newer, counted anew', tokens: null, tokenEncoding: null },
        { role: 'assistant', content: 'newest, counted anew', tokens: null, tokenEncoding: null },
      ] as const;
      for (const message of stored) await insertMessages(db, projectId, 1, message);
      const response = await budgeted.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'Hi' } });
      expect(response.statusCode).toBe(200);
      expect(sentHistory()).toEqual(['newer, counted anew', 'newest, counted anew']);

      await db.update(messages).set({ tokens: 3 }).where(eq(messages.content, 'believed to be huge'));
      await budgeted.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'Hi' } });
      expect(sentHistory().slice(0, 6)).toEqual(stored.map((message) => message.content));
    } finally {
      await budgeted.close();
    }
  });

  it('reads a long history only as far as the budget reaches, leaving out nothing that fits', async () => {
    const budgeted = await startTestApp({ AI_BASE_URL: fake.url, AI_CONTEXT_TOKENS: '4000', AI_MAX_OUTPUT_TOKENS: '100' });
    try {
      const owner = await registerUser(budgeted.app);
      const projectId = (await createProject(budgeted.app, owner, { model: 'gpt-4o-mini' })).id;
      const start = Date.now() - 3_600_000;
      // The newest 300 counted three ways: never, in the model's encoding, and (wrongly large) in another
      // one; the older ones, where the budget runs out, in the model's encoding, so the cut is exact there.
      const rows = Array.from({ length: 1000 }, (_, i) => {
        const content = `message ${i}`;
        const exact = { tokens: countTokens(content, 'gpt-4o-mini'), tokenEncoding: 'o200k_base' };
        const counted = i < 700 ? exact : [{ tokens: null, tokenEncoding: null }, exact, { tokens: 999, tokenEncoding: 'cl100k_base' }][i % 3]!;
        return { id: uuidv7(), projectId, role: i % 2 ? ('assistant' as const) : ('user' as const), content, status: 'complete' as const, createdAt: new Date(start + i), ...counted };
      });
      await budgeted.testDb.database.db.insert(messages).values(rows);
      const response = await budgeted.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'Hi' } });
      expect(response.statusCode).toBe(200);

      let room = 4000 - 100 - 3 - (4 + countTokens('Hi', 'gpt-4o-mini'));
      let fits = 0;
      for (let i = 999; i >= 0 && room >= 4 + countTokens(`message ${i}`, 'gpt-4o-mini'); i--, fits++) room -= 4 + countTokens(`message ${i}`, 'gpt-4o-mini');
      expect(fits).toBeGreaterThan(64 + 256); // the third page is the one cut
      expect(fits).toBeLessThan(1000);
      expect(sentHistory()).toEqual(Array.from({ length: fits }, (_, k) => `message ${1000 - fits + k}`));
    } finally {
      await budgeted.close();
    }
  });

  it('reads a history longer than its first pages whole, oldest first, when it fits', async () => {
    const projectId = await newProject();
    const count = 64 + 256 + 30;
    await insertMessages(t.testDb.database.db, projectId, count);
    expect((await chat(projectId, { message: 'All of it?' })).statusCode).toBe(200);
    expect(sentHistory()).toEqual(Array.from({ length: count }, (_, i) => `message ${i}`));
  });
});

describe('the history cache', () => {
  const sentHistory = () => (fake.requests.at(-1)!.body.messages as { content: string }[]).slice(0, -1).map((m) => m.content);
  /** Every stored message but the last turn's two: the history that turn was sent. */
  const historyBeforeLastTurn = async (projectId: string) => (await stored(projectId)).slice(0, -2).map((m) => m.content);
  const turn = async (projectId: string, message: string) => expect((await chat(projectId, { message })).statusCode).toBe(200);

  it('sends a long history from memory on the next turns, as stored, and reads it again when it no longer lines up', async () => {
    const projectId = await newProject();
    const { db } = t.testDb.database;
    await insertMessages(db, projectId, 300);
    await turn(projectId, 'first');
    expect(sentHistory()).toEqual(await historyBeforeLastTurn(projectId));
    await turn(projectId, 'second');
    expect(sentHistory()).toEqual(await historyBeforeLastTurn(projectId));

    // Stored messages never change; one changed behind the service's back shows where the turn read from.
    await db.update(messages).set({ content: 'changed in the database' }).where(eq(messages.content, 'message 5'));
    await turn(projectId, 'third');
    expect(sentHistory()).toContain('message 5');
    expect(sentHistory()).not.toContain('changed in the database');

    // A question and its answer written by hand, older than the newest message the cache holds: the
    // question of the turn before last (its answer, and the last turn's question and answer come after them).
    const [cachedQuestion] = (await stored(projectId)).slice(-4);
    await insertMessages(db, projectId, 2, { content: 'stored out of order', createdAt: new Date(cachedQuestion!.createdAt.getTime() - 1) });
    await turn(projectId, 'fourth');
    const sent = sentHistory();
    expect(sent).toEqual(await historyBeforeLastTurn(projectId));
    expect(sent).toContain('stored out of order');
    expect(sent).toContain('changed in the database');
  });

  it('sends none of a cleared history, even when as much is written again', async () => {
    const projectId = await newProject();
    const { db } = t.testDb.database;
    await insertMessages(db, projectId, 300, { content: 'before clearing' });
    await turn(projectId, 'first');
    await turn(projectId, 'second');
    const cleared = await clearHistory(projectId);
    expect(cleared.statusCode).toBe(204);
    await insertMessages(db, projectId, 300);
    await turn(projectId, 'third');
    expect(sentHistory()).toEqual(Array.from({ length: 300 }, (_, i) => `message ${i}`));
  });

  it("drops a cached history's oldest messages as turns fill the window, in any encoding, as a read from the database would", async () => {
    const budgeted = await startTestApp({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini', AI_CONTEXT_TOKENS: '4000', AI_MAX_OUTPUT_TOKENS: '100' });
    try {
      const owner = await registerUser(budgeted.app);
      const projectId = (await createProject(budgeted.app, owner)).id;
      const { db } = budgeted.testDb.database;
      const start = Date.now() - 3_600_000;
      // More than the window holds, each counted in the default model's encoding, as the service stores them.
      const rows = Array.from({ length: 1_000 }, (_, i) => {
        const content = `message ${i}${' word'.repeat(i % 7)}`;
        const role = i % 2 ? ('assistant' as const) : ('user' as const);
        return { id: uuidv7(), projectId, role, content, status: 'complete' as const, createdAt: new Date(start + i), tokens: countTokens(content, 'gpt-4o-mini'), tokenEncoding: 'o200k_base' };
      });
      await db.insert(messages).values(rows);
      const CHANGED = 'changed in the database';
      let changedFrom = '';
      /**
       * The newest messages stored before the last turn that fit beside its `question` in `model`'s window,
       * oldest first, as they were first stored; but an answer at its start, whose question did not fit.
       */
      const window = async (question: string, model: string) => {
        const history = (await stored(projectId, budgeted)).slice(0, -2).reverse();
        let room = 4000 - 100 - REPLY_PRIMING_TOKENS - (MESSAGE_OVERHEAD_TOKENS + countTokens(question, model));
        const fits: { role: string; content: string }[] = [];
        for (const row of history) {
          const content = row.content === CHANGED ? changedFrom : row.content;
          const tokens = MESSAGE_OVERHEAD_TOKENS + (row.tokenEncoding === encodingName(model) ? row.tokens! : countTokens(content, model));
          if (tokens > room) break;
          room -= tokens;
          fits.push({ role: row.role, content });
        }
        const oldestFirst = fits.reverse();
        return (oldestFirst[0]?.role === 'assistant' ? oldestFirst.slice(1) : oldestFirst).map((message) => message.content);
      };
      const turn = async (message: string, model = 'gpt-4o-mini') => {
        const response = await budgeted.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message } });
        expect(response.statusCode).toBe(200);
        expect(sentHistory()).toEqual(await window(message, model));
      };

      await turn('first'); // read from the database, and cached
      expect(sentHistory().length).toBeGreaterThan(64);
      expect(sentHistory().length).toBeLessThan(1_000);
      for (const message of ['second, a little longer than the first', 'third', `fourth${' word'.repeat(60)}`]) await turn(message);
      // Sent from memory: a message changed behind the service's back is sent as it was first stored.
      changedFrom = sentHistory().at(-20)!;
      await db.update(messages).set({ content: CHANGED }).where(and(eq(messages.projectId, projectId), eq(messages.content, changedFrom)));
      await turn('fifth');
      expect(sentHistory()).toContain(changedFrom);

      // A model of another encoding counts the cached messages anew, once and on the next turns.
      const patched = await budgeted.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}`, headers: owner.auth, payload: { model: 'gpt-4' } });
      expect(patched.statusCode).toBe(200);
      for (const message of ['sixth', `seventh${' word'.repeat(30)}`]) await turn(message, 'gpt-4');
      expect(sentHistory()).toContain(changedFrom);
    } finally {
      await budgeted.close();
    }
  });

  // What is deleted is not kept in the process either: a heap dump of it held a deleted account's conversations.
  it.each(['the history is cleared', 'the project is deleted', 'the account is deleted'])('keeps nothing of a history in memory once %s', async (what) => {
    // A window that takes all of it: 100 messages of 20 KB (4,000 tokens each), cached once a turn has read
    // them. A model of no known window: AI_CONTEXT_TOKENS is then its window.
    const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'llama3.2', AI_CONTEXT_TOKENS: '2000000' }), { database: t.testDb.database });
    try {
      const owner = await registerUser(app);
      const projectId = (await createProject(app, owner)).id;
      await insertMessages(t.testDb.database.db, projectId, 100, { content: `${'word '.repeat(4_000)} ${projectId}` });
      const turned = await app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'read it all' } });
      expect(turned.statusCode).toBe(200);
      expect(fake.requests.at(-1)!.body.messages).toHaveLength(101);
      fake.reset(); // the fake's own record of what was sent
      const whileCached = reachableHeapBytes();
      const deleting = {
        'the history is cleared': { method: 'DELETE', url: `/api/v1/projects/${projectId}/messages` },
        'the project is deleted': { method: 'DELETE', url: `/api/v1/projects/${projectId}` },
        'the account is deleted': { method: 'DELETE', url: '/api/v1/auth/me', payload: { password: owner.password } },
      }[what] as { method: 'DELETE'; url: string; payload?: object };
      expect((await app.inject({ ...deleting, headers: owner.auth })).statusCode).toBe(204);
      // The 2 MB of its messages' text let go.
      expect(whileCached - reachableHeapBytes()).toBeGreaterThan(1_500_000);
    } finally {
      await app.close();
    }
  });
});

describe('provider faults', () => {
  async function failedChat(status: number, code: string) {
    const projectId = await newProject();
    const response = await chat(projectId, { message: 'Will it work?' });
    const body = expectProblem(response, status, code);
    expect(response.body).not.toContain(UPSTREAM_ERROR_TEXT.slice(0, 20));
    expect(response.body).not.toContain('sk-upstream');
    const rows = await stored(projectId);
    // The question is kept, marked failed: its turn stored no answer.
    expect(rows.map((r) => [r.role, r.content, r.status])).toEqual([['user', 'Will it work?', 'failed']]);
    expect(body.userMessageId).toBe(rows[0]!.id);
    return { response, body, projectId };
  }

  it('lists a failed question as failed and leaves it out of the context of the turns after it', async () => {
    fake.enqueue({ status: 500 }, { status: 500 }, { status: 500 });
    const { projectId } = await failedChat(502, 'PROVIDER_ERROR');
    const asked = await chat(projectId, { message: 'Will it work?' });
    expect(asked.statusCode, asked.body).toBe(200);
    // Asked again after the failure, the question goes upstream once.
    expect(fake.requests.at(-1)!.body.messages).toEqual([{ role: 'user', content: 'Will it work?' }]);
    const listed = await t.app.inject({ method: 'GET', url: `/api/v1/projects/${projectId}/messages`, headers: user.auth });
    expect(listed.json().data.map((m: { role: string; status: string }) => [m.role, m.status])).toEqual([
      ['user', 'failed'],
      ['user', 'complete'],
      ['assistant', 'complete'],
    ]);
    // A failed question is history, not context, in a history read page by page too: failed past the first page.
    fake.setDefault({ status: 500 });
    await chat(projectId, { message: 'lost' });
    fake.setDefault({});
    await insertMessages(t.testDb.database.db, projectId, 70);
    expect((await chat(projectId, { message: 'last' })).statusCode).toBe(200);
    const sent = fake.requests.at(-1)!.body.messages as { content: string }[];
    expect(sent.map((m) => m.content)).toContain('Will it work?');
    expect(sent.map((m) => m.content)).not.toContain('lost');
    expect(sent.at(-1)).toEqual({ role: 'user', content: 'last' });
  });

  it('retries 5xx at most AI_MAX_RETRIES times, then 502 PROVIDER_ERROR', async () => {
    fake.setDefault({ status: 500 });
    await failedChat(502, 'PROVIDER_ERROR');
    expect(fake.requests).toHaveLength(3);
  });

  it('recovers when a retry succeeds, honouring Retry-After', async () => {
    fake.enqueue({ status: 429, retryAfter: 1 }, { status: 503 });
    const projectId = await newProject();
    const response = await chat(projectId, { message: 'eventually' });
    expect(response.statusCode).toBe(200);
    expect(fake.requests).toHaveLength(3);
    expect(fake.requests[1]!.receivedAt - fake.requests[0]!.receivedAt).toBeGreaterThanOrEqual(950);
    expect((await stored(projectId)).map((r) => r.role)).toEqual(['user', 'assistant']);
  });

  it('answers 503 PROVIDER_RATE_LIMITED with Retry-After when 429 persists', async () => {
    fake.setDefault({ status: 429, retryAfter: 30 });
    const { response, body } = await failedChat(503, 'PROVIDER_RATE_LIMITED');
    expect(response.headers['retry-after']).toBe('30');
    expect(body.retryAfter).toBe(30);
  });

  it('names the seconds to wait in a stream’s error event, which comes after the headers', async () => {
    fake.setDefault({ status: 429, retryAfter: 30 });
    const projectId = await newProject();
    const events = await readSse(await streamChat(projectId, { message: 'rate limited' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'error']);
    expect(events[1]!.data).toMatchObject({ status: 503, code: 'PROVIDER_RATE_LIMITED', retryAfter: 30 });
  });

  it('retries an answer whose connection breaks after the headers: a JSON body half-way, a stream before its first delta', async () => {
    fake.enqueue({ fault: 'reset-mid-body' }, {}, { fault: 'reset', afterChunks: 0 }, {});
    const projectId = await newProject();
    expect((await chat(projectId, { message: 'cut once' })).statusCode).toBe(200);
    const events = await readSse(await streamChat(projectId, { message: 'cut again' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'delta', 'delta', 'done']);
    expect(fake.requests).toHaveLength(4);
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'cut once', 'complete'],
      ['assistant', 'Echo: cut once', 'complete'],
      ['user', 'cut again', 'complete'],
      ['assistant', 'Echo: cut again', 'complete'],
    ]);
  });

  it('answers 504 PROVIDER_TIMEOUT when the upstream hangs past the deadline', async () => {
    fake.setDefault({ fault: 'hang' });
    await failedChat(504, 'PROVIDER_TIMEOUT');
    await fake.waitForClientClose();
  });

  it.each(['malformed-json', 'no-choices', 'error-body'] as const)('answers 502 for a %s body', async (fault) => {
    fake.setDefault({ fault });
    await failedChat(502, 'PROVIDER_ERROR');
  });

  it('stores and answers an upstream reply the database could not hold as sent: NUL as U+FFFD, counts that are not counts as no usage', async () => {
    const projectId = await newProject();
    fake.enqueue({ content: 'a\u0000b', model: 'model\u0000x' });
    const json = await chat(projectId, { message: 'one' });
    expect(json.statusCode, json.body).toBe(200);
    expect(json.json().assistantMessage).toMatchObject({ content: 'a\uFFFDb', model: 'model\uFFFDx', status: 'complete' });
    fake.enqueue({ content: 'c\u0000d', chunks: 2 });
    const events = await readSse(await streamChat(projectId, { message: 'two' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'delta', 'done']);
    expect(events.filter((e) => e.event === 'delta').map((e) => e.data.content).join('')).toBe('c\uFFFDd');
    for (const usage of [{ prompt_tokens: 1e10, completion_tokens: 1, total_tokens: 3 }, { prompt_tokens: 1.5, completion_tokens: 1, total_tokens: 3 }, { prompt_tokens: -1, completion_tokens: 1, total_tokens: 0 }]) {
      fake.enqueue({ content: 'counted', usage });
      const response = await chat(projectId, { message: 'three' });
      expect(response.statusCode, response.body).toBe(200);
      expect(response.json()).toMatchObject({ usage: null, assistantMessage: { usage: null } });
    }
    const rows = await stored(projectId);
    expect(rows.map((r) => [r.role, r.content])).toEqual([
      ['user', 'one'], ['assistant', 'a\uFFFDb'], ['user', 'two'], ['assistant', 'c\uFFFDd'],
      ...Array.from({ length: 3 }, () => [['user', 'three'], ['assistant', 'counted']]).flat(),
    ]);
  });

  it('names the stored question when the database refuses the answer, as every failed call does', async () => {
    const projectId = await newProject();
    await refusingAnswers(projectId, '', async () => {
      const body = expectProblem(await chat(projectId, { message: 'store me' }), 500, 'INTERNAL');
      const rows = await stored(projectId);
      expect(rows.map((r) => [r.role, r.content])).toEqual([['user', 'store me']]);
      expect(body.userMessageId).toBe(rows[0]!.id);
    });
  });

  it('treats an empty answer as a failure and stores no empty assistant message', async () => {
    fake.setDefault({ content: '' });
    await failedChat(502, 'PROVIDER_ERROR');
  });
});

describe('streaming chat', () => {
  it('sends user_message, deltas as they come, then done, each with an id', async () => {
    const projectId = await newProject();
    fake.enqueue({ content: 'one two three four', chunks: 4, chunkDelayMs: 150 });
    const response = await streamChat(projectId, { message: 'count' });
    expect(response.status).toBe(200);
    expect(response.headers.get('content-type')).toMatch(/^text\/event-stream/);
    expect(response.headers.get('x-request-id')).toBeTruthy();

    let firstDeltaSeenWhileUpstreamSending = false;
    const events = await readSse(response, (event) => {
      if (event.event === 'delta' && !firstDeltaSeenWhileUpstreamSending) {
        firstDeltaSeenWhileUpstreamSending = fake.requests[0]!.chunksSent < 4;
      }
    });
    expect(firstDeltaSeenWhileUpstreamSending).toBe(true);
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'delta', 'delta', 'delta', 'done']);
    expect(events.map((e) => Number(e.id))).toEqual([1, 2, 3, 4, 5, 6]);
    const text = events.filter((e) => e.event === 'delta').map((e) => e.data.content).join('');
    expect(text).toBe('one two three four');
    const done = events.at(-1)!.data as { assistantMessage: { id: string; content: string; status: string }; usage: unknown };
    expect(done.assistantMessage).toMatchObject({ content: text, status: 'complete' });
    expect(done.usage).toEqual(expect.objectContaining({ totalTokens: expect.any(Number) }));
    const rows = await stored(projectId);
    expect(rows.map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'count', 'complete'],
      ['assistant', text, 'complete'],
    ]);
    expect((events[0]!.data.userMessage as { id: string }).id).toBe(rows[0]!.id);
    expect(fake.requests[0]!.body.stream).toBe(true);
  });

  it('aborts the upstream call when the client leaves and keeps the text so far as incomplete', async () => {
    const projectId = await newProject();
    fake.enqueue({ content: 'a b c d e f g h', chunks: 8, chunkDelayMs: 200 });
    const controller = new AbortController();
    const response = await streamChat(projectId, { message: 'long answer' }, controller.signal);
    let deltas = 0;
    await readSse(response, (event) => (event.event === 'delta' && ++deltas === 2 ? 'stop' : undefined), controller);
    await fake.waitForClientClose();
    expect(fake.requests[0]!.chunksSent).toBeLessThan(8);

    await expect.poll(async () => (await stored(projectId)).length, { timeout: 5000 }).toBe(2);
    const [question, answer] = await stored(projectId);
    expect(question).toMatchObject({ role: 'user', content: 'long answer', status: 'complete' });
    expect(answer!.role).toBe('assistant');
    expect(answer!.status).toBe('incomplete');
    expect('a b c d e f g h'.startsWith(answer!.content)).toBe(true);
    expect(answer!.content.length).toBeGreaterThan(0);
  });

  // The upstream sent its whole answer and its usage, and then nothing for a while (no [DONE]): the
  // client that left then had the whole text, and the provider billed the tokens.
  it('stores a reply whose text was over complete, with its usage, when its client leaves before its done', async () => {
    const projectId = await newProject();
    const usage = { prompt_tokens: 9, completion_tokens: 2, total_tokens: 11 };
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    fake.enqueue({ content: 'all said', chunks: 2, fault: 'open-after-finish', usage });
    const controller = new AbortController();
    const response = await streamChat(projectId, { message: 'leave at the end' }, controller.signal, key);
    let deltas = 0;
    await readSse(response, (event) => (event.event === 'delta' && ++deltas === 2 ? 'stop' : undefined), controller);
    await expect.poll(async () => (await stored(projectId)).length, { timeout: 5000 }).toBe(2);
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status, r.promptTokens, r.completionTokens])).toEqual([
      ['user', 'leave at the end', 'complete', null, null],
      ['assistant', 'all said', 'complete', 9, 2],
    ]);
    // Its key kept the result: the client's retry is its replay.
    const retried = await streamChat(projectId, { message: 'leave at the end' }, undefined, key);
    expect(retried.headers.get('idempotent-replayed')).toBe('true');
    expect((await readSse(retried)).find((e) => e.event === 'done')!.data.assistantMessage).toMatchObject({ content: 'all said', status: 'complete' });
    expect(fake.requests).toHaveLength(1);
  });

  it('calls no provider for a client that left while its turn was prepared', async () => {
    const projectId = await newProject();
    const abortedCalls = async () =>
      seriesValue((await t.app.inject({ method: 'GET', url: '/metrics' })).body, 'ai_provider_request_duration_seconds_count', { outcome: 'aborted' });
    const abortedBefore = await abortedCalls();
    let locked!: () => void;
    let release!: () => void;
    const isLocked = new Promise<void>((resolve) => (locked = resolve));
    const released = new Promise<void>((resolve) => (release = resolve));
    // The turn's read (it stores the question) waits behind this lock, and on PGlite behind the transaction.
    const holding = t.testDb.database.transaction(async (tx) => {
      await tx.execute(sql`lock table messages in share mode`);
      locked();
      await released;
    });
    await isLocked;
    const controller = new AbortController();
    const leaving = streamChat(projectId, { message: 'gone early' }, controller.signal).catch(() => undefined);
    await sleep(300); // the request is waiting on its read
    controller.abort();
    await leaving;
    await sleep(100); // and the server has seen its connection close
    release();
    await holding;
    await expect.poll(async () => (await stored(projectId)).length, { timeout: 5000 }).toBe(1);
    await sleep(300); // time enough for a provider call the turn should not make
    expect(fake.requests).toHaveLength(0);
    // Nor is a call counted that was never made.
    expect(await abortedCalls()).toBe(abortedBefore);
    // Kept, and failed: its turn has no answer.
    await expect.poll(async () => (await stored(projectId)).map((r) => [r.role, r.content, r.status]), { timeout: 5000 }).toEqual([['user', 'gone early', 'failed']]);
  });

  it('ends with an error event and keeps the text so far when the upstream breaks mid-stream', async () => {
    const projectId = await newProject();
    // Named by the upstream as it answered: the model stored with what came of the answer, as with a whole one.
    fake.enqueue({ content: 'first second third', chunks: 3, fault: 'reset', afterChunks: 2, model: 'gpt-4o-mini-2024-07-18' });
    const events = await readSse(await streamChat(projectId, { message: 'break' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'delta', 'error']);
    const error = events.at(-1)!.data;
    const rows = await stored(projectId);
    expect(error).toMatchObject({ status: 502, code: 'PROVIDER_ERROR', userMessageId: rows[0]!.id, type: 'about:blank' });
    expect(rows.map((r) => [r.role, r.status])).toEqual([
      ['user', 'complete'],
      ['assistant', 'incomplete'],
    ]);
    expect(rows[1]!.content).toBe(events.filter((e) => e.event === 'delta').map((e) => e.data.content).join(''));
    expect(rows[1]!.model).toBe('gpt-4o-mini-2024-07-18');
  });

  it("answers with the model's refusal, which OpenAI's models send in place of content, JSON and streamed", async () => {
    const projectId = await newProject();
    fake.enqueue({ refusal: 'I cannot help with that.' }, { refusal: 'Nor with that.' });
    const answered = await chat(projectId, { message: 'something declined' });
    expect(answered.statusCode).toBe(200);
    expect(answered.json().assistantMessage.content).toBe('I cannot help with that.');
    const events = await readSse(await streamChat(projectId, { message: 'declined again' }));
    expect(events.filter((e) => e.event === 'delta').map((e) => e.data.content).join('')).toBe('Nor with that.');
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'something declined', 'complete'],
      ['assistant', 'I cannot help with that.', 'complete'],
      ['user', 'declined again', 'complete'],
      ['assistant', 'Nor with that.', 'complete'],
    ]);
  });

  // An answer the upstream stopped at its output limit (AI_MAX_OUTPUT_TOKENS) or its content filter is
  // the turn's answer, but not a whole one: stored, answered and listed as `incomplete`, so that a
  // client can say so (and offer to go on), as OpenAI's Responses API does.
  it('answers and stores a reply cut short at the output limit or by a content filter as incomplete, JSON and streamed', async () => {
    const projectId = await newProject();
    fake.enqueue({ content: 'A long answer that stops', finishReason: 'length' }, { content: 'Filtered', finishReason: 'content_filter' }, { content: 'Whole.' });
    const answered = await chat(projectId, { message: 'tell me everything' });
    expect(answered.statusCode).toBe(200);
    expect(answered.json().assistantMessage).toMatchObject({ content: 'A long answer that stops', status: 'incomplete' });
    const events = await readSse(await streamChat(projectId, { message: 'something filtered' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'done']);
    expect(events.at(-1)!.data.assistantMessage).toMatchObject({ content: 'Filtered', status: 'incomplete' });
    expect((await chat(projectId, { message: 'short' })).json().assistantMessage.status).toBe('complete');
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'tell me everything', 'complete'],
      ['assistant', 'A long answer that stops', 'incomplete'],
      ['user', 'something filtered', 'complete'],
      ['assistant', 'Filtered', 'incomplete'],
      ['user', 'short', 'complete'],
      ['assistant', 'Whole.', 'complete'],
    ]);
  });

  it('waits for a reasoning model that streams its thinking for longer than AI_TIMEOUT_MS: it is not silent', async () => {
    const projectId = await newProject();
    // 6 chunks of thinking, 500 ms apart: 3 s before the first text, past the deadline.
    expect(6 * 500).toBeGreaterThan(t.config.AI_TIMEOUT_MS);
    fake.enqueue({ content: 'Considered answer', thinking: 6, chunkDelayMs: 500 });
    const events = await readSse(await streamChat(projectId, { message: 'think hard' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'delta', 'done']);
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'think hard', 'complete'],
      ['assistant', 'Considered answer', 'complete'],
    ]);
  });

  it('completes an answer whose upstream sent its finish_reason, then neither [DONE] nor the end of the response', async () => {
    const projectId = await newProject();
    fake.enqueue({ content: 'all of it', fault: 'open-after-finish' });
    const events = await readSse(await streamChat(projectId, { message: 'then silence' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'delta', 'delta', 'delta', 'done']);
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'then silence', 'complete'],
      ['assistant', 'all of it', 'complete'],
    ]);
  });

  it("answers a failure to store the whole answer as the database's, not the provider's, and keeps no part of it", async () => {
    const projectId = await newProject();
    // The database refuses this project's complete answer, and nothing else.
    await refusingAnswers(projectId, " and new.status = 'complete'", async () => {
      const events = await readSse(await streamChat(projectId, { message: 'store me' }));
      expect(events.map((e) => e.event).filter((event) => event !== 'delta')).toEqual(['user_message', 'error']);
      const rows = await stored(projectId);
      expect(events.at(-1)!.data).toMatchObject({ status: 500, code: 'INTERNAL', userMessageId: rows[0]!.id });
      expect(rows.map((r) => [r.role, r.status])).toEqual([['user', 'complete']]);
    });
  });

  it('reports a failure before the first delta as an error event, with nothing but the question stored', async () => {
    const projectId = await newProject();
    fake.setDefault({ status: 500 });
    const events = await readSse(await streamChat(projectId, { message: 'fail' }));
    expect(events.map((e) => e.event)).toEqual(['user_message', 'error']);
    expect(events[1]!.data).toMatchObject({ code: 'PROVIDER_ERROR', status: 502 });
    expect(JSON.stringify(events)).not.toContain('sk-upstream');
    // Announced complete, then marked failed once its turn had no answer.
    expect(events[0]!.data).toMatchObject({ userMessage: { status: 'complete' } });
    expect((await stored(projectId)).map((r) => [r.role, r.status])).toEqual([['user', 'failed']]);
    // So is a question whose stream had no text.
    fake.setDefault({ content: '' });
    const empty = await readSse(await streamChat(projectId, { message: 'nothing' }));
    expect(empty.map((e) => e.event)).toEqual(['user_message', 'error']);
    expect((await stored(projectId)).map((r) => [r.content, r.status])).toEqual([
      ['fail', 'failed'],
      ['nothing', 'failed'],
    ]);
  });

  it("logs what failed a stream (the upstream's answer), as a JSON turn's failure is logged, and tells its client only the problem", async () => {
    const logs = logCollector();
    const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MAX_RETRIES: '0', LOG_LEVEL: 'warn' }), { database: t.testDb.database, logStream: logs.stream });
    try {
      const url = await app.listen({ port: 0, host: '127.0.0.1' });
      fake.setDefault({ status: 401 });
      const projectId = await newProject();
      const response = await fetch(`${url}/api/v1/projects/${projectId}/chat`, {
        method: 'POST',
        headers: { ...user.auth, 'content-type': 'application/json' },
        body: JSON.stringify({ message: 'wrong key', stream: true }),
      });
      const events = await readSse(response);
      expect(events.at(-1)).toMatchObject({ event: 'error', data: { status: 502, code: 'PROVIDER_ERROR' } });
      expect(JSON.stringify(events)).not.toContain('LEAK');
      const logged = logs.lines.find((line) => line.msg === 'chat stream failed');
      expect(JSON.stringify(logged)).toContain('upstream answered 401');
    } finally {
      await app.close();
    }
  });

  it('refuses before the stream opens with an ordinary problem response', async () => {
    const response = await streamChat(uuidv7(), { message: 'nobody' });
    expect(response.status).toBe(404);
    expect(response.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  });
});

describe('idempotency', () => {
  it('replays a retry that spells the project id in capitals, the same project', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    const first = await chat(projectId, { message: 'spelled' }, key);
    expect(first.statusCode).toBe(200);
    const retry = await chat(projectId.toUpperCase(), { message: 'spelled' }, key);
    expect(retry.statusCode).toBe(200);
    expect(retry.json()).toEqual(first.json());
    expect(fake.requests).toHaveLength(1);
    expect(await stored(projectId)).toHaveLength(2);
  });

  // AI_TIMEOUT_MS is 2 s here: a running key that says nothing for 4 s is taken over. Each stream takes
  // about 5.6 s, a chunk every 400 ms (each one pushes its deadline back): deltas, or a model's thinking.
  it.each<[string, UpstreamReply]>([
    ['deltas', { content: 'a b c d e f g h i j k l m n o', chunks: 15, chunkDelayMs: 400 }],
    ['a model thinking before its first delta', { content: 'thought through', thinking: 14, chunkDelayMs: 400 }],
  ])('keeps a key from being taken over while its stream goes on past the bound for a silent one: %s', async (_, upstreamReply) => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    fake.enqueue(upstreamReply);
    const first = streamChat(projectId, { message: 'long' }, undefined, key).then((response) => readSse(response));
    await sleep(4_600);
    expectProblem(await chat(projectId, { message: 'long', stream: true }, key), 409, 'IDEMPOTENCY_CONFLICT');
    expect((await first).at(-1)!.event).toBe('done');
    expect(fake.requests).toHaveLength(1);
    expect((await stored(projectId)).map((r) => r.role)).toEqual(['user', 'assistant']);
  });

  it('takes over a key that its request, on an instance that died, left running', async () => {
    const projectId = await newProject();
    const running = (key: string, createdAt: Date, aliveAt: Date) =>
      t.testDb.database.db
        .insert(idempotencyKeys)
        .values({ userId: user.id, key, requestHash: requestHash({ projectId, message: 'again', stream: false }), state: 'running', createdAt, aliveAt });
    const now = new Date();
    const past = new Date(Date.now() - 10_000);
    const alive = `key-${uuidv7()}`;
    const dead = `key-${uuidv7()}`;
    // Taken over by an instance of the code before alive_at, which moves created_at alone.
    const takenOver = `key-${uuidv7()}`;
    await running(alive, past, now);
    await running(dead, past, past);
    await running(takenOver, now, past);
    expectProblem(await chat(projectId, { message: 'again' }, { 'idempotency-key': alive }), 409, 'IDEMPOTENCY_CONFLICT');
    expectProblem(await chat(projectId, { message: 'again' }, { 'idempotency-key': takenOver }), 409, 'IDEMPOTENCY_CONFLICT');
    expect((await chat(projectId, { message: 'again' }, { 'idempotency-key': dead })).statusCode).toBe(200);
  });

  // A (a 400 is not retried) stops saying it is alive, as a stream whose client stopped reading does: its
  // row is aged to say so, and B takes the key over. However A then ends, the key stays B's: a third
  // request is refused while B runs (A's failure freed it, A's answer completed it, before the claim id),
  // and afterwards the key replays B's answer. A's answer is not stored (409), B's is: one answer to the
  // key's question. One key, one provider call per holder.
  it.each([
    ['fails', { status: 400 }, 502],
    ['answers', { content: 'answer of A' }, 409],
  ])('leaves a key taken over to its new holder when the request it was taken from %s', async (_, firstReply, firstStatus) => {
    const projectId = await newProject();
    const key = `key-${uuidv7()}`;
    const keyed = () => chat(projectId, { message: 'one key' }, { 'idempotency-key': key });
    const keyRow = and(eq(idempotencyKeys.userId, user.id), eq(idempotencyKeys.key, key));
    fake.enqueue({ delayMs: 1_000, ...firstReply }, { delayMs: 1_500, content: 'answer of B' }, { content: 'answer of C' });
    let firstSettled = false;
    const first = keyed().finally(() => (firstSettled = true));
    await expect.poll(async () => (await t.testDb.database.db.select().from(idempotencyKeys).where(keyRow)).length).toBe(1);
    const aMinuteAgo = sql`now() - interval '1 minute'`;
    await t.testDb.database.db.update(idempotencyKeys).set({ createdAt: aMinuteAgo, aliveAt: aMinuteAgo }).where(keyRow);
    const second = keyed();
    await fake.waitForRequests(2);
    expect(firstSettled).toBe(false);
    expect((await first).statusCode).toBe(firstStatus);
    expectProblem(await keyed(), 409, 'IDEMPOTENCY_CONFLICT');
    const answered = await second;
    expect(answered.json().assistantMessage.content).toBe('answer of B');
    expect((await keyed()).json()).toEqual(answered.json());
    expect(fake.requests).toHaveLength(2);
    // A's question, whatever A met, has no answer of its own: failed, and left out of the turns after.
    expect((await stored(projectId)).map((row) => [row.role, row.content, row.status])).toEqual([
      ['user', 'one key', 'failed'],
      ['user', 'one key', 'complete'],
      ['assistant', 'answer of B', 'complete'],
    ]);
    expect((await chat(projectId, { message: 'next' })).statusCode).toBe(200);
    expect(fake.requests.at(-1)!.body.messages).toEqual([
      { role: 'user', content: 'one key' },
      { role: 'assistant', content: 'answer of B' },
      { role: 'user', content: 'next' },
    ]);
  });

  it('lets no beat of the request a key was taken from keep it alive', async () => {
    // Silent after 400 ms: a beat every 100 ms.
    const store = new IdempotencyStore(t.testDb.database.db, 400);
    const key = `key-${uuidv7()}`;
    const keyRow = and(eq(idempotencyKeys.userId, user.id), eq(idempotencyKeys.key, key));
    const aliveAt = async () => (await t.testDb.database.db.select().from(idempotencyKeys).where(keyRow))[0]!.aliveAt.getTime();
    const projectId = await newProject();
    const first = await store.claim(user.id, projectId, key, 'hash');
    await sleep(500);
    const second = await store.claim(user.id, projectId, key, 'hash');
    expect(second.kind).toBe('claimed');
    const takenOverAt = await aliveAt();
    if (first.kind !== 'claimed') throw new Error('the first claim replayed');
    const hold = store.keepAlive(user.id, key, first.claimId);
    hold.progressed();
    // Time for its beat (and two more) to reach the database.
    await sleep(300);
    hold.stop();
    expect(await aliveAt()).toBe(takenOverAt);
  });

  it('replays the first result for the same key and body, without calling the provider again', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    const first = await chat(projectId, { message: 'once' }, key);
    const again = await chat(projectId, { message: 'once' }, key);
    expect(first.statusCode).toBe(200);
    expect(again.statusCode).toBe(200);
    expect(again.json()).toEqual(first.json());
    // Said of the replay alone: a client that bills by the answers' usage counts this one once.
    expect([first.headers['idempotent-replayed'], again.headers['idempotent-replayed']]).toEqual([undefined, 'true']);
    expect(fake.requests).toHaveLength(1);
    expect(await stored(projectId)).toHaveLength(2);
  });

  it('replays a streamed result as a stream', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    // The retry leaves the moment `done` arrives, before the first stream has even ended: already a replay.
    let retry: Promise<Response> | undefined;
    const first = await readSse(await streamChat(projectId, { message: 'stream once' }, undefined, key), (event) => {
      if (event.event === 'done') retry = streamChat(projectId, { message: 'stream once' }, undefined, key);
    });
    const retried = await retry!;
    expect(retried.status).toBe(200);
    expect(retried.headers.get('idempotent-replayed')).toBe('true');
    const again = await readSse(retried);
    expect(fake.requests).toHaveLength(1);
    const done = (events: SseEvent[]) => events.find((e) => e.event === 'done')!.data;
    expect(done(again)).toEqual(done(first));
    expect(again.map((e) => e.event)).toEqual(['user_message', 'delta', 'done']);
  });

  // Changed between the first request and its retry: the key's first result is the retry's answer,
  // as a JSON turn and as a stream, and no provider is called again.
  it.each([
    ['its provider is no longer configured', { provider: 'openrouter' }],
    ['its prompts no longer fit its model', { model: 'gpt-4' }],
  ])('replays the first result once the project is set so that %s', async (_, change) => {
    const projectId = await newProject();
    // About 9,000 tokens: within gpt-4o-mini's budget, past gpt-4's (8,192).
    await addPrompt(projectId, 'word '.repeat(9_000));
    const json = { 'idempotency-key': `key-${uuidv7()}` };
    const streamed = { 'idempotency-key': `key-${uuidv7()}` };
    const first = await chat(projectId, { message: 'before' }, json);
    expect(first.statusCode).toBe(200);
    const done = async (response: Response) => (await readSse(response)).find((e) => e.event === 'done')?.data;
    const firstStreamed = await done(await streamChat(projectId, { message: 'before' }, undefined, streamed));
    await t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}`, headers: user.auth, payload: change });

    const again = await chat(projectId, { message: 'before' }, json);
    expect([again.statusCode, again.json(), again.headers['idempotent-replayed']]).toEqual([200, first.json(), 'true']);
    expect(await done(await streamChat(projectId, { message: 'before' }, undefined, streamed))).toEqual(firstStreamed);
    expect(fake.requests).toHaveLength(2);
    // A new request is refused as the project is now.
    expect((await chat(projectId, { message: 'after' }, { 'idempotency-key': `key-${uuidv7()}` })).statusCode).toBe('provider' in change ? 503 : 400);
  });

  it('answers 422 for the same key with a different body', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    expect((await chat(projectId, { message: 'one' }, key)).statusCode).toBe(200);
    expectProblem(await chat(projectId, { message: 'two' }, key), 422, 'IDEMPOTENCY_MISMATCH');
    expectProblem(await chat(projectId, { message: 'one', stream: true }, key), 422, 'IDEMPOTENCY_MISMATCH');
    expect(fake.requests).toHaveLength(1);
  });

  it('answers 409 while the first request is still running, though the project was changed since so that a new turn is refused', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    fake.enqueue({ delayMs: 500 });
    const first = chat(projectId, { message: 'slow' }, key);
    await fake.waitForRequests(1);
    const running = await chat(projectId, { message: 'slow' }, key);
    expectProblem(running, 409, 'IDEMPOTENCY_CONFLICT');
    // When to ask again: by then most turns are answered, and the retry is their replay.
    expect(running.headers['retry-after']).toBe(String(IN_PROGRESS_RETRY_AFTER_SECONDS));
    await t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${projectId}`, headers: user.auth, payload: { provider: 'openrouter' } });
    expectProblem(await chat(projectId, { message: 'slow' }, key), 409, 'IDEMPOTENCY_CONFLICT');
    expect((await first).statusCode).toBe(200);
    expect((await chat(projectId, { message: 'slow' }, key)).json()).toEqual((await first).json());
    expect(fake.requests).toHaveLength(1);
  });

  // The answer and the key's result are stored together. When the result could not be kept, the key was
  // freed for a retry while the answer stayed stored: once the retry answered, the history held two answers.
  it.each([false, true])('stores no answer whose key could not keep its result (streamed: %s), so that a retry stores one', async (stream) => {
    const projectId = await newProject();
    const key = `key-${uuidv7()}`;
    const keyed = () =>
      stream
        ? streamChat(projectId, { message: 'answered once' }, undefined, { 'idempotency-key': key }).then((response) => readSse(response))
        : chat(projectId, { message: 'answered once' }, { 'idempotency-key': key });
    let failedQuestion: string | undefined;
    await refusing('before update on idempotency_keys', `new.key = '${key}' and new.state = 'done'`, async () => {
      const failed = await keyed();
      if (Array.isArray(failed)) expect(failed.at(-1)!.event).toBe('error');
      failedQuestion = (Array.isArray(failed) ? failed.at(-1)!.data : expectProblem(failed, 500, 'INTERNAL')).userMessageId as string;
    });
    const retried = await keyed();
    const answer = (Array.isArray(retried) ? retried.find((event) => event.event === 'done')!.data.assistantMessage : retried.json().assistantMessage) as { id: string };
    const history = await stored(projectId);
    expect(history.map((row) => [row.role, row.id])).toEqual([
      ['user', failedQuestion],
      ['user', history[1]!.id],
      ['assistant', answer.id],
    ]);
    expect(fake.requests).toHaveLength(2);
  });

  // The database failing the answer's store and then the key's release, as in an outage: the release's
  // failure took the turn's place (JSON: a 500 without userMessageId) or was met twice (a stream's, once
  // more in the catch, logged as an error by Fastify).
  it("answers a keyed turn's own failure when its key cannot be released either", async () => {
    const projectId = await newProject();
    const logs = logCollector();
    const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini', LOG_LEVEL: 'warn' }), { database: t.testDb.database, logStream: logs.stream });
    try {
      const url = await app.listen({ port: 0, host: '127.0.0.1' });
      await refusingAnswers(projectId, '', () =>
        refusing('before delete on idempotency_keys', `old.user_id = '${user.id}'`, async () => {
          const json = await chat(projectId, { message: 'json' }, { 'idempotency-key': `key-${uuidv7()}` }, app);
          expect(expectProblem(json, 500, 'INTERNAL').userMessageId).toEqual(expect.any(String));
          const events = await readSse(await streamChat(projectId, { message: 'streamed' }, undefined, { 'idempotency-key': `key-${uuidv7()}` }, url));
          expect([events[0]!.event, events.at(-1)!.event]).toEqual(['user_message', 'error']);
          expect(events.at(-1)!.data.userMessageId).toBe((events[0]!.data.userMessage as { id: string }).id);
          // A stream's key is released once the stream has ended: its client may read the end first.
          await expect.poll(() => logs.lines.filter((line) => line.msg === 'idempotency key not released')).toHaveLength(2);
        }),
      );
      expect(logs.lines.map((line) => line.msg)).not.toContain('Promise errored, but reply.sent = true was set');
    } finally {
      await app.close();
    }
  });

  it('frees the key after a failure so that the same key may be retried', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    fake.enqueue({ status: 500 }, { status: 500 }, { status: 500 });
    expectProblem(await chat(projectId, { message: 'retry me' }, key), 502, 'PROVIDER_ERROR');
    expect((await chat(projectId, { message: 'retry me' }, key)).statusCode).toBe(200);
  });

  // A mobile client whose stream broke sends its question again with the same key: the model is to read it once.
  it("marks an attempt's question failed when a retry with its key asks it again, so that the model is sent it once", async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    expect((await chat(projectId, { message: 'before' })).statusCode).toBe(200);
    fake.enqueue({ content: 'first second third', chunks: 3, fault: 'reset', afterChunks: 2 });
    const broken = await readSse(await streamChat(projectId, { message: 'asked twice' }, undefined, key));
    expect(broken.at(-1)!.event).toBe('error');

    const retry = await readSse(await streamChat(projectId, { message: 'asked twice' }, undefined, key));
    expect(retry.at(-1)!.event).toBe('done');
    const sent = () => fake.requests.at(-1)!.body.messages;
    expect(sent()).toEqual([
      { role: 'user', content: 'before' },
      { role: 'assistant', content: 'Echo: before' },
      { role: 'user', content: 'asked twice' },
    ]);
    expect((await chat(projectId, { message: 'after' })).statusCode).toBe(200);
    expect(sent()).toEqual([
      { role: 'user', content: 'before' },
      { role: 'assistant', content: 'Echo: before' },
      { role: 'user', content: 'asked twice' },
      { role: 'assistant', content: 'Echo: asked twice' },
      { role: 'user', content: 'after' },
    ]);
    // Nothing stored is lost: the broken attempt stays listed, its question marked failed.
    expect((await stored(projectId)).map((r) => [r.role, r.content, r.status])).toEqual([
      ['user', 'before', 'complete'],
      ['assistant', 'Echo: before', 'complete'],
      ['user', 'asked twice', 'failed'],
      ['assistant', 'first second', 'incomplete'],
      ['user', 'asked twice', 'complete'],
      ['assistant', 'Echo: asked twice', 'complete'],
      ['user', 'after', 'complete'],
      ['assistant', 'Echo: after', 'complete'],
    ]);
    // A replay now marks nothing.
    expect((await readSse(await streamChat(projectId, { message: 'asked twice' }, undefined, key))).at(-1)!.event).toBe('done');
    expect((await stored(projectId)).filter((r) => r.status === 'failed')).toHaveLength(1);
  });

  // Another instance keeps the history in memory past its newest page, and marked nothing itself.
  it("has every instance's kept history forget the attempt's question that a retry marks deep in it", async () => {
    const other = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini' }), { database: t.testDb.database });
    try {
      const projectId = await newProject();
      const key = { 'idempotency-key': `key-${uuidv7()}` };
      fake.enqueue({ content: 'first second third', chunks: 3, fault: 'reset', afterChunks: 2 });
      expect((await readSse(await streamChat(projectId, { message: 'asked twice' }, undefined, key))).at(-1)!.event).toBe('error');
      // Past the first page of 64 messages: the other instance keeps the history, the broken attempt in it.
      for (let turn = 0; turn < 34; turn++) expect((await chat(projectId, { message: `turn ${turn}` }, {}, other)).statusCode).toBe(200);
      expect((await chat(projectId, { message: 'asked twice' }, key)).statusCode).toBe(200);
      expect((await chat(projectId, { message: 'after' }, {}, other)).statusCode).toBe(200);
      const sent = fake.requests.at(-1)!.body.messages as { content: string }[];
      expect(sent.filter((m) => m.content === 'asked twice')).toHaveLength(1);
      expect(sent.map((m) => m.content)).not.toContain('first second');
    } finally {
      await other.close();
    }
  });

  // A key freed by a failure may be sent again with another message: a new turn, which takes nothing back.
  it('leaves the failed attempt\'s question as it is when its key comes back with another message', async () => {
    const projectId = await newProject();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    fake.enqueue({ content: 'first second third', chunks: 3, fault: 'reset', afterChunks: 2 });
    expect((await readSse(await streamChat(projectId, { message: 'question A' }, undefined, key))).at(-1)!.event).toBe('error');
    expect((await chat(projectId, { message: 'question B' }, key)).statusCode).toBe(200);
    expect(fake.requests.at(-1)!.body.messages).toEqual([
      { role: 'user', content: 'question A' },
      { role: 'assistant', content: 'first second' },
      { role: 'user', content: 'question B' },
    ]);
    expect((await stored(projectId)).map((r) => r.status)).toEqual(['complete', 'incomplete', 'complete', 'complete']);
  });

  it('leaves a question asked with a key before the replay window as it is when the key is used again', async () => {
    const projectId = await newProject();
    const key = `key-${uuidv7()}`;
    const [old] = await insertMessages(t.testDb.database.db, projectId, 1, { idempotencyKey: key, createdAt: new Date(Date.now() - 25 * 3600_000) });
    const answered = await chat(projectId, { message: 'a new question' }, { 'idempotency-key': key });
    expect(answered.statusCode).toBe(200);
    expect((await stored(projectId)).map((r) => [r.id, r.status])).toContainEqual([old!.id, 'complete']);
  });

  it('keeps keys per user and refuses a key over 255 characters', async () => {
    const projectId = await newProject();
    const key = `shared-${uuidv7()}`;
    const other = await registerUser(t.app);
    const theirProject = await newProject(other);
    expect((await chat(projectId, { message: 'mine' }, { 'idempotency-key': key })).statusCode).toBe(200);
    const theirs = await t.app.inject({
      method: 'POST',
      url: `/api/v1/projects/${theirProject}/chat`,
      headers: { ...other.auth, 'idempotency-key': key },
      payload: { message: 'theirs' },
    });
    expect(theirs.json().assistantMessage.content).toBe('Echo: theirs');
    expectProblem(await chat(projectId, { message: 'x' }, { 'idempotency-key': 'k'.repeat(256) }), 400, 'VALIDATION_ERROR');
  });

  // A key's kept result holds the question and the answer whole: what a clear or a deletion removes.
  it('keeps no result of a key past its history cleared or its project deleted: a retry after a clear is a new turn', async () => {
    const keyed = (key: string) => t.testDb.database.db.select().from(idempotencyKeys).where(and(eq(idempotencyKeys.userId, user.id), eq(idempotencyKeys.key, key)));
    const projectId = await newProject();
    const other = await newProject();
    const key = `key-${uuidv7()}`;
    const otherKey = `key-${uuidv7()}`;
    const first = await chat(projectId, { message: 'private, then cleared' }, { 'idempotency-key': key });
    expect(first.statusCode).toBe(200);
    expect((await chat(other, { message: 'another project' }, { 'idempotency-key': otherKey })).statusCode).toBe(200);
    expect(await keyed(key)).toEqual([expect.objectContaining({ projectId, state: 'done' })]);

    const clear = await clearHistory(projectId);
    expect(clear.statusCode).toBe(204);
    expect(await keyed(key)).toEqual([]);
    // Another project's key is its own.
    expect(await keyed(otherKey)).toEqual([expect.objectContaining({ projectId: other, state: 'done' })]);

    const retry = await chat(projectId, { message: 'private, then cleared' }, { 'idempotency-key': key });
    expect(retry.statusCode).toBe(200);
    expect(retry.json().userMessage.id).not.toBe(first.json().userMessage.id);
    expect(fake.requests).toHaveLength(3);
    expect((await stored(projectId)).map((row) => row.id)).toEqual([retry.json().userMessage.id, retry.json().assistantMessage.id]);

    expect((await deleteProject(projectId)).statusCode).toBe(204);
    expect(await keyed(key)).toEqual([]);
    expect(await keyed(otherKey)).toHaveLength(1);
  });
});

describe('idempotency keys past their replay window', () => {
  /** Inserts keys of `user`, each aged in SQL (an interval ago); returns the keys, named by their label. */
  async function agedKeys(rows: Record<string, { state: 'running' | 'done'; created: string; alive?: string }>) {
    const tag = uuidv7();
    const ago = (interval: string) => sql`now() - ${interval}::interval`;
    await t.testDb.database.db.insert(idempotencyKeys).values(
      Object.entries(rows).map(([label, { state, created, alive = created }]) => ({
        userId: user.id,
        key: `${label}-${tag}`,
        requestHash: 'hash',
        state,
        response: state === 'done' ? { question: 'x'.repeat(1_000) } : null,
        createdAt: ago(created),
        aliveAt: ago(alive),
      })),
    );
    const left = async () =>
      (await t.testDb.database.db.select({ key: idempotencyKeys.key }).from(idempotencyKeys).where(sql`${idempotencyKeys.key} like ${`%-${tag}`}`))
        .map((row) => row.key.slice(0, -tag.length - 1))
        .sort();
    return { left, tag };
  }

  it('are taken over by a new request when done, but not while their request still runs and is heard from', async () => {
    const { tag } = await agedKeys({
      'done-old': { state: 'done', created: '25 hours' },
      'running-alive': { state: 'running', created: '25 hours', alive: '1 second' },
    });
    const store = new IdempotencyStore(t.testDb.database.db, 2 * t.config.AI_TIMEOUT_MS);
    const projectId = await newProject();
    expect((await store.claim(user.id, projectId, `done-old-${tag}`, 'hash')).kind).toBe('claimed');
    await expect(store.claim(user.id, projectId, `running-alive-${tag}`, 'hash')).rejects.toMatchObject({ status: 409, code: 'IDEMPOTENCY_CONFLICT' });
  });

  it('are deleted in batches, but for a key whose request still runs', async () => {
    const { left } = await agedKeys({
      ...Object.fromEntries(Array.from({ length: 5 }, (_, i) => [`done-${i}`, { state: 'done', created: '25 hours' }] as const)),
      'running-stale': { state: 'running', created: '25 hours' },
      'running-alive': { state: 'running', created: '25 hours', alive: '1 second' },
      'done-fresh': { state: 'done', created: '23 hours' },
      // Stale, but a retry taking it over is what ends it, within the window.
      'running-stale-fresh': { state: 'running', created: '1 hour' },
    });
    // The store the app sweeps with, on the app's database; 2 a batch: the sweep goes on past a full one.
    const store = new IdempotencyStore(t.testDb.database.db, 2 * t.config.AI_TIMEOUT_MS);
    expect(await store.sweep(2)).toBe(6);
    expect(await left()).toEqual(['done-fresh', 'running-alive', 'running-stale-fresh']);
  });

  it('are deleted as the app starts, and the count logged', async () => {
    const { left } = await agedKeys({ expired: { state: 'done', created: '25 hours' }, fresh: { state: 'done', created: '1 hour' } });
    const logs = logCollector();
    const app = await buildApp(testConfig({ LOG_LEVEL: 'info' }), { database: t.testDb.database, logStream: logs.stream });
    try {
      await expect.poll(left).toEqual(['fresh']);
      await expect.poll(() => logs.lines.find((line) => line.msg === 'removed the idempotency keys past their replay window')).toMatchObject({ removed: 1 });
    } finally {
      await app.close();
    }
  });
});

describe('chats at once per user (CHAT_CONCURRENCY_PER_USER)', () => {
  // One chat at a time: a turn held open (a stream, a JSON turn whose upstream hangs until the deadline)
  // takes the user's only slot.
  let capped: TestApp;
  let cappedUrl: string;
  let owner: RegisteredUser;
  beforeAll(async () => {
    capped = await startTestApp({
      AI_BASE_URL: fake.url,
      AI_MODEL: 'gpt-4o-mini',
      AI_TIMEOUT_MS: '3000',
      AI_MAX_RETRIES: '0',
      CHAT_CONCURRENCY_PER_USER: '1',
    });
    cappedUrl = await capped.app.listen({ port: 0, host: '127.0.0.1' });
    owner = await registerUser(capped.app);
  });
  afterAll(() => capped.close());

  const projectOf = async (who = owner) => (await createProject(capped.app, who)).id;
  const send = (projectId: string, payload: object, headers: Record<string, string> = {}, who = owner) =>
    chat(projectId, payload, { ...who.auth, ...headers }, capped.app);
  const open = (projectId: string, message: string, signal?: AbortSignal) => streamChat(projectId, { message }, signal, owner.auth, cappedUrl);

  /** The slot is free again: the user's next chat is answered, once the turn that ended has done its bookkeeping. */
  async function slotFreed() {
    const projectId = await projectOf();
    await expect.poll(async () => (await send(projectId, { message: 'next' })).statusCode, { timeout: 5_000 }).toBe(200);
  }

  /** A chat of either kind, in a project of its own, is 429 with Retry-After before any work: nothing stored, no provider called. */
  async function expectRefused() {
    const projectId = await projectOf();
    const calls = fake.requests.length;
    const json = await send(projectId, { message: 'one too many' });
    expectProblem(json, 429, 'RATE_LIMITED');
    expect(json.headers['retry-after']).toBe('5');
    const streamed = await open(projectId, 'one too many');
    expect([streamed.status, streamed.headers.get('content-type'), streamed.headers.get('retry-after')]).toEqual([429, 'application/problem+json; charset=utf-8', '5']);
    expect(await streamed.json()).toMatchObject({ status: 429, code: 'RATE_LIMITED' });
    expect(await stored(projectId, capped)).toEqual([]);
    expect(fake.requests).toHaveLength(calls);
  }

  /** A JSON turn whose upstream answers `reply`: `meanwhile` runs while it holds the slot, which it frees as it fails. */
  async function failingJsonTurn(reply: UpstreamReply, meanwhile: () => Promise<unknown>, status: number, code: string) {
    fake.enqueue(reply);
    const calls = fake.requests.length;
    const turn = send(await projectOf(), { message: 'held' });
    await fake.waitForRequests(calls + 1);
    await meanwhile();
    expectProblem(await turn, status, code);
    await slotFreed();
  }

  it('refuses a chat past the cap, JSON or streamed, in any project, with 429 and Retry-After, storing nothing; another user is unaffected', async () => {
    // A stream held open by an upstream that sends nothing, until its client leaves.
    fake.enqueue({ fault: 'hang' });
    const leave = new AbortController();
    await open(await projectOf(), 'held open', leave.signal);
    await fake.waitForRequests(1);
    await expectRefused();
    const other = await registerUser(capped.app);
    expect((await send(await projectOf(other), { message: 'mine' }, {}, other)).json().assistantMessage.content).toBe('Echo: mine');
    leave.abort();
    await slotFreed();

    // A JSON turn holds the slot as long, here until its deadline.
    await failingJsonTurn({ fault: 'hang' }, expectRefused, 504, 'PROVIDER_TIMEOUT');
  });

  it('holds the slot while a chat runs and frees it however it ends: a stream done, left mid-way or broken upstream, a failed call, a replay, a refusal', async () => {
    const elsewhere = await projectOf();
    /** The chat under way has the slot: another of the user's is refused. */
    const slotTaken = async () => expectProblem(await send(elsewhere, { message: 'meanwhile' }), 429, 'RATE_LIMITED');

    // Each answer takes a second or so, time for the refusal while it runs.
    fake.enqueue({ content: 'one two three', chunks: 3, chunkDelayMs: 500 });
    const done = await open(await projectOf(), 'all of it');
    await slotTaken();
    expect((await readSse(done)).at(-1)!.event).toBe('done');
    await slotFreed();

    fake.enqueue({ content: 'a b c d e f g h', chunks: 8, chunkDelayMs: 300 });
    const leave = new AbortController();
    const left = await open(await projectOf(), 'leaving', leave.signal);
    await slotTaken();
    let deltas = 0;
    await readSse(left, (e) => (e.event === 'delta' && ++deltas === 2 ? 'stop' : undefined), leave);
    await fake.waitForClientClose();
    await slotFreed();

    fake.enqueue({ content: 'first second third', chunks: 3, chunkDelayMs: 500, fault: 'reset', afterChunks: 2 });
    const broken = await open(await projectOf(), 'broken');
    await slotTaken();
    expect((await readSse(broken)).at(-1)!.data).toMatchObject({ code: 'PROVIDER_ERROR' });
    await slotFreed();

    await failingJsonTurn({ status: 500, delayMs: 1_000 }, slotTaken, 502, 'PROVIDER_ERROR');

    // Each of these would be 429 if the one before still held the slot.
    const projectId = await projectOf();
    const key = { 'idempotency-key': `key-${uuidv7()}` };
    const first = await send(projectId, { message: 'once' }, key);
    expect((await send(projectId, { message: 'once' }, key)).json()).toEqual(first.json());
    expectProblem(await send(uuidv7(), { message: 'nowhere' }), 404, 'NOT_FOUND');
    await slotFreed();
    expect(await stored(elsewhere, capped)).toEqual([]);
  });
});

describe('concurrency', () => {
  it('answers concurrent chats to one project, each reply paired with its own question', async () => {
    const projectId = await newProject();
    fake.setDefault({ delayMs: 50 });
    const questions = Array.from({ length: 20 }, (_, i) => `question ${i}`);
    const responses = await Promise.all(questions.map((message) => chat(projectId, { message })));
    for (const [i, response] of responses.entries()) {
      expect(response.statusCode).toBe(200);
      expect(response.json().userMessage.content).toBe(questions[i]);
      expect(response.json().assistantMessage.content).toBe(`Echo: ${questions[i]}`);
    }
    const rows = await stored(projectId);
    expect(rows).toHaveLength(40);
    expect(new Set(rows.map((r) => r.content)).size).toBe(40);
    // Stored in the order each came, questions before answers; the next turn sends each answer after its own question.
    expect(rows.slice(0, 2).map((r) => r.role)).toEqual(['user', 'user']);
    fake.reset();
    await chat(projectId, { message: 'and now?' });
    const sent = fake.requests[0]!.body.messages as { role: string; content: string }[];
    expect(sent).toHaveLength(41);
    for (let i = 0; i < 40; i += 2) {
      expect(sent[i]!.role).toBe('user');
      expect(sent[i + 1]).toEqual({ role: 'assistant', content: `Echo: ${sent[i]!.content}` });
    }
    expect(new Set(sent.map((m) => m.content)).size).toBe(41);
  });

  it('leaves a question whose turn is still running out of the context of a turn beside it', async () => {
    const projectId = await newProject();
    fake.enqueue({ delayMs: 500 }, {});
    const slow = chat(projectId, { message: 'slow question' });
    while (fake.requests.length === 0) await sleep(5);
    expect((await chat(projectId, { message: 'quick question' })).statusCode).toBe(200);
    expect(fake.requests[1]!.body.messages).toEqual([{ role: 'user', content: 'quick question' }]);
    expect((await slow).statusCode).toBe(200);
  });
});

describe('the history cleared or the project deleted during a turn', () => {
  /** Until the fake upstream has the turn's request: the question is stored by then. */
  const called = async () => {
    while (fake.requests.length === 0) await sleep(5);
  };

  it('stores no answer without its question: a JSON turn whose history was cleared is 409, one whose project was deleted 404', async () => {
    for (const [remove, status, code] of [[clearHistory, 409, 'CONFLICT'], [deleteProject, 404, 'NOT_FOUND']] as const) {
      fake.reset();
      const projectId = await newProject();
      fake.enqueue({ delayMs: 300 });
      const turn = chat(projectId, { message: 'asked before' });
      await called();
      expect((await remove(projectId)).statusCode).toBe(204);
      expectProblem(await turn, status, code);
      expect(await stored(projectId)).toEqual([]);
    }
  });

  // A project on the default model, whose turn's read stores its question (and waits for the history's
  // lock to do so), and one with a model of its own, whose question is stored after the read.
  it.runIf(process.env.TEST_DATABASE_URL).each([
    ['the default model', {}],
    ['a model of its own', { model: 'gpt-4o-mini' }],
  ])('sends nothing of a history cleared between the read and the question, stores nothing: 409 (a project on %s)', async (_, project) => {
    fake.reset();
    const projectId = await newProject(user, project);
    await insertMessages(t.testDb.database.db, projectId, 2, { content: 'SECRET, cleared before the turn is asked' });
    const clearing = new pg.Client({ connectionString: t.testDb.url });
    await clearing.connect();
    try {
      // The history's lock, as a clear takes it: the turn reads its history, then waits for it to store its question.
      await clearing.query('begin');
      await clearing.query('select lock_project_messages($1)', [projectId]);
      const turn = chat(projectId, { message: 'asked after' });
      const waiting = async () => (await clearing.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`)).rows[0]!.n;
      await expect.poll(waiting, { timeout: 10_000 }).toBe(1);
      await clearing.query('delete from messages where project_id = $1', [projectId]);
      await clearing.query('commit');
      expectProblem(await turn, 409, 'CONFLICT');
      expect(fake.requests).toEqual([]);
      expect(await stored(projectId)).toEqual([]);
    } finally {
      await clearing.end();
    }
  });

  it('refuses a turn whose account was deleted during it as any request of a deleted account: 401, JSON and streamed', async () => {
    for (const stream of [false, true]) {
      fake.reset();
      const owner = await registerUser(t.app);
      const projectId = await newProject(owner);
      fake.enqueue(stream ? { content: 'one two three four five six seven eight', chunkDelayMs: 150 } : { delayMs: 1000 });
      const headers = { ...owner.auth, 'content-type': 'application/json' };
      const turn = fetch(`${baseUrl}/api/v1/projects/${projectId}/chat`, { method: 'POST', headers, body: JSON.stringify({ message: 'asked before', stream }) });
      await called();
      const deleted = await t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: owner.auth, payload: { password: owner.password } });
      expect(deleted.statusCode).toBe(204);
      const response = await turn;
      const problem = stream ? (await readSse(response)).at(-1)!.data : await response.json();
      expect(response.status).toBe(stream ? 200 : 401);
      expect(problem).toMatchObject({ status: 401, code: 'UNAUTHORIZED' });
    }
  });

  it('ends a stream whose token was revoked during it with a 401 event in place of a client error, naming no question', async () => {
    const owner = await registerUser(t.app);
    const projectId = await newProject(owner);
    fake.enqueue({ content: 'one two three four five six seven eight', chunkDelayMs: 150 });
    // The answer refused as if its project had gone meanwhile (the foreign key's own error, 404 by itself).
    const answers = { when: `new.project_id = '${projectId}' and new.role = 'assistant'`, error: "'gone' using errcode = 'foreign_key_violation'" };
    await refusingWrites(t.testDb.database.db, 'before insert on messages', async () => {
      const events = streamChat(projectId, { message: 'asked before' }, undefined, owner.auth).then((response) => readSse(response));
      await called();
      await revokeTokens(t.app, owner);
      const last = (await events).at(-1)!;
      expect(last.event).toBe('error');
      expect(last.data).toMatchObject({ status: 401, code: 'UNAUTHORIZED' });
      expect(last.data).not.toHaveProperty('userMessageId');
    }, answers);
  });

  it('ends a stream whose history was cleared with an error event, its answer not stored, and stores the next turn whole', async () => {
    const projectId = await newProject();
    fake.enqueue({ content: 'one two three four', chunkDelayMs: 100 });
    const events = streamChat(projectId, { message: 'asked before', stream: true }).then((response) => readSse(response));
    await called();
    expect((await clearHistory(projectId)).statusCode).toBe(204);
    const received = await events;
    expect(received.map((event) => event.event)).toEqual(['user_message', 'delta', 'delta', 'delta', 'delta', 'error']);
    expect(received.at(-1)!.data).toMatchObject({ status: 409, code: 'CONFLICT' });
    expect(await stored(projectId)).toEqual([]);
    expect((await chat(projectId, { message: 'after' })).statusCode).toBe(200);
    expect((await stored(projectId)).map((m) => m.content)).toEqual(['after', 'Echo: after']);
  });

  it('answers a turn whose provider failed after its history was cleared 409, naming no question: there is none', async () => {
    const projectId = await newProject();
    // The upstream says nothing (more) until the deadline (2 s here): the turn fails, its question long gone.
    const cases: [boolean, UpstreamReply][] = [[false, { fault: 'hang' }], [true, { fault: 'hang' }], [true, { content: 'one two three', fault: 'stall', afterChunks: 1 }]];
    for (const [stream, upstreamReply] of cases) {
      fake.enqueue(upstreamReply);
      const answered = stream
        ? streamChat(projectId, { message: 'asked before' }).then(async (response) => (await readSse(response)).at(-1)!.data)
        : chat(projectId, { message: 'asked before' }).then((response) => expectProblem(response, 409, 'CONFLICT'));
      await called();
      expect((await clearHistory(projectId)).statusCode).toBe(204);
      const problem = await answered;
      expect(problem, JSON.stringify(upstreamReply)).toMatchObject({ status: 409, code: 'CONFLICT', detail: 'The history was cleared during the turn: nothing of it is kept' });
      expect(problem).not.toHaveProperty('userMessageId');
      expect(await stored(projectId)).toEqual([]);
      fake.requests.length = 0;
    }
  });
});

describe('the time a message is stored at', () => {
  it('follows the newest message of the project even when the clock is behind it (a clock set back)', async () => {
    const projectId = await newProject();
    const [future] = await insertMessages(t.testDb.database.db, projectId, 1, { createdAt: new Date(Date.now() + 3_600_000) });
    for (const stream of [false, true]) {
      const response = await (stream ? chat(projectId, { message: 'streamed', stream: true }) : chat(projectId, { message: 'plain' }));
      expect(response.statusCode).toBe(200);
    }
    const rows = await stored(projectId);
    expect(rows.map((m) => m.content)).toEqual([future!.content, 'plain', 'Echo: plain', 'streamed', 'Echo: streamed']);
    // A microsecond apart: each stamp is the newest's plus one, the clock being an hour behind.
    const micros = await t.testDb.database.db
      .select({ micros: sql<string>`(extract(epoch from ${messages.createdAt}) * 1000000)::bigint::text` })
      .from(messages)
      .where(eq(messages.projectId, projectId))
      .orderBy(messages.createdAt);
    const steps = micros.map((row, i) => (i === 0 ? 0 : Number(BigInt(row.micros) - BigInt(micros[i - 1]!.micros))));
    expect(steps).toEqual([0, 1, 1, 1, 1]);
  });
});

describe.skipIf(!process.env.TEST_DATABASE_URL)('a question stored late (PostgreSQL: concurrent connections)', () => {
  /** The project's messages a page of one at a time from `cursor`, while `more` says to go on. */
  async function walkMessages(projectId: string, seen: string[], cursor: string | undefined, more: () => boolean) {
    do {
      const url = `/api/v1/projects/${projectId}/messages?limit=1${cursor ? `&cursor=${cursor}` : ''}`;
      const page = (await t.app.inject({ method: 'GET', url, headers: user.auth })).json();
      seen.push(...page.data.map((m: { content: string }) => m.content));
      cursor = page.nextCursor ?? undefined;
    } while (cursor && more());
    return cursor;
  }

  it('is listed after what was stored before it: a cursor walk already past that finds it', async () => {
    const projectId = await newProject();
    await chat(projectId, { message: 'first' });
    // Another transaction holds the key's row: the keyed turn waits at its claim, after it was prepared.
    const blocker = new pg.Client({ connectionString: t.testDb.url });
    await blocker.connect();
    try {
      await blocker.query('begin');
      await blocker.query(`insert into idempotency_keys (user_id, key, request_hash, state) values ($1, 'late', 'held', 'running')`, [user.id]);
      const keyed = chat(projectId, { message: 'keyed' }, { 'idempotency-key': 'late' });
      while ((await blocker.query('select 1 from pg_stat_activity where pg_backend_pid() = any(pg_blocking_pids(pid))')).rowCount === 0) await sleep(10);
      expect((await chat(projectId, { message: 'plain' })).statusCode).toBe(200);

      const seen: string[] = [];
      const cursor = await walkMessages(projectId, seen, undefined, () => !seen.includes('plain'));
      await blocker.query('rollback');
      expect((await keyed).statusCode).toBe(200);
      await walkMessages(projectId, seen, cursor, () => true);
      expect(seen).toEqual(['first', 'Echo: first', 'plain', 'Echo: plain', 'keyed', 'Echo: keyed']);
    } finally {
      await blocker.end();
    }
  });

  // A JSON turn's question is committed without a flush; the answer's durable commit would flush it. When
  // that store failed, its failure named the question all the same, which a crash could still take away.
  it("names the question in a JSON turn's failure to store its answer only once it is durable", async () => {
    const projectId = await newProject();
    const database = openPostgres(t.testDb.url!, { queryTimeoutMs: 300 });
    const app = await buildApp(testConfig({ AI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini' }), { database });
    const blocker = new pg.Client({ connectionString: t.testDb.url });
    await blocker.connect();
    try {
      // The answer's store, then the flush, each meet a lock on the messages and go unanswered.
      fake.enqueue({ delayMs: 500 });
      const turn = chat(projectId, { message: 'never flushed' }, {}, app);
      await fake.waitForRequests(1);
      await blocker.query('begin');
      await blocker.query('lock table messages in access exclusive mode');
      const body = expectProblem(await turn, 503, 'SERVICE_UNAVAILABLE');
      expect(body).not.toHaveProperty('userMessageId');
      await blocker.query('rollback');

      // With only the answer refused, the flush makes the question durable and the failure names it.
      await refusingAnswers(projectId, '', async () => {
        const named = expectProblem(await chat(projectId, { message: 'flushed' }, {}, app), 500, 'INTERNAL');
        expect((await stored(projectId)).map((row) => [row.id, row.content])).toContainEqual([named.userMessageId, 'flushed']);
      });
    } finally {
      await blocker.end();
      await app.close();
      await database.close();
    }
  });

  /**
   * Runs `run` while a trigger holds every message stored with `content` inside its statement (after its
   * stamp and its checks, before its commit) until `open()`. `held(request)` waits until the request sent
   * is held as well, by the trigger or by what it holds, or answered (it needed nothing held).
   */
  async function holdingMessages(content: string, run: (gate: { held(request: Promise<unknown>): Promise<void>; open(): Promise<unknown> }) => Promise<void>) {
    const GATE = 8_008;
    const gate = new pg.Client({ connectionString: t.testDb.url });
    await gate.connect();
    await gate.query(`create function test_gate() returns trigger language plpgsql as $$ begin perform pg_advisory_xact_lock_shared(${GATE}); return new; end $$`);
    await gate.query(`create trigger test_gate before insert on messages for each row when (new.content = '${content}') execute function test_gate()`);
    const waiting = async () => Number((await gate.query('select count(*) from pg_stat_activity where datname = current_database() and cardinality(pg_blocking_pids(pid)) > 0')).rows[0].count);
    const sent: Promise<unknown>[] = [];
    try {
      await gate.query('select pg_advisory_lock($1)', [GATE]);
      await run({
        async held(request) {
          let answered = false;
          sent.push(request.finally(() => (answered = true)));
          while (!answered && (await waiting()) < sent.length) await sleep(5);
        },
        open: () => gate.query('select pg_advisory_unlock($1)', [GATE]),
      });
    } finally {
      // Whatever failed, what it held is let through before the trigger is dropped.
      await gate.query('select pg_advisory_unlock_all()');
      await Promise.allSettled(sent);
      await gate.query('drop trigger test_gate on messages; drop function test_gate()');
      await gate.end();
    }
  }

  it('is committed before a message stamped after it: a walk past the later one does not miss it', async () => {
    const projectId = await newProject();
    await chat(projectId, { message: 'first' });
    await holdingMessages('held', async (gate) => {
      const held = chat(projectId, { message: 'held' });
      await gate.held(held);
      // The other turn either waits for the held one's commit, or (stamped later, committed first) answers.
      const other = chat(projectId, { message: 'other' });
      await gate.held(other);

      // A walk as far as one message short of the end of what is listed now: it then has a cursor.
      const listed = (await stored(projectId)).length;
      const first = (await t.app.inject({ method: 'GET', url: `/api/v1/projects/${projectId}/messages?limit=${listed - 1}`, headers: user.auth })).json();
      const seen: string[] = first.data.map((m: { content: string }) => m.content);
      await gate.open();
      expect((await held).statusCode).toBe(200);
      expect((await other).statusCode).toBe(200);
      await walkMessages(projectId, seen, first.nextCursor, () => true);
      const all = (await stored(projectId)).map((m) => m.content);
      expect(all).toHaveLength(6);
      expect(seen).toEqual(all);
    });
  });

  it('clears an answer that was being stored: the clear waits for its commit', async () => {
    const projectId = await newProject();
    await holdingMessages('Echo: held', async (gate) => {
      // The answer is held after its question was found; the clear either waits for its commit, or
      // (deleting what it saw) answers first.
      const held = chat(projectId, { message: 'held' });
      await gate.held(held);
      const cleared = clearHistory(projectId);
      await gate.held(cleared);
      await gate.open();
      expect((await held).statusCode).toBe(200);
      expect((await cleared).statusCode).toBe(204);
      expect(await stored(projectId)).toEqual([]);
    });
  });
});

describe('closing the app', () => {
  it("closes the providers' connections once the turns are done", async () => {
    const ownFake = await FakeUpstream.start();
    const own = await startTestApp({ AI_BASE_URL: ownFake.url, AI_MODEL: 'gpt-4o-mini' });
    try {
      const owner = await registerUser(own.app);
      const projectId = (await createProject(own.app, owner)).id;
      const answered = await own.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: owner.auth, payload: { message: 'Hi' } });
      expect(answered.statusCode).toBe(200);
      await own.app.close();
      await ownFake.waitForNoConnections(1_000);
    } finally {
      await own.close();
      await ownFake.close();
    }
  });
});
