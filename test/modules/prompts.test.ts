import { eq, sql } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prompts } from '../../src/db/schema.js';
import type { ProjectDto } from '../../src/modules/projects/schemas.js';
import { createProject, createPrompt, expectProblem, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';
import { expectDeleteFreesOneSlot, expectFull, expectOneOfManyIntoTheLastSlot, type Holder } from '../support/limits.js';
import { expectTimesInListOrder } from '../support/clock-behind.js';
import { expectCreateListedAfterDeletedNewest } from '../support/deleted-newest.js';
import { expectWaitingCreateListedLast } from '../support/waiting-create.js';

let t: TestApp;
let user: RegisteredUser;
let project: ProjectDto;
beforeAll(async () => {
  t = await startTestApp();
  user = await registerUser(t.app);
  project = await createProject(t.app, user);
});
afterAll(() => t.close());

const request = (method: 'GET' | 'POST' | 'PATCH' | 'DELETE', path: string, payload?: unknown, projectId = project.id) =>
  t.app.inject({
    method,
    url: `/api/v1/projects/${projectId}/prompts${path}`,
    headers: user.auth,
    ...(payload === undefined ? {} : { payload: payload as object }),
  });

const errorPaths = (body: Record<string, unknown>) => [...new Set((body.errors as { path: string }[]).map((e) => e.path))].sort();

describe('create and get', () => {
  it('creates a prompt under the project', async () => {
    const response = await request('POST', '', { title: '  Tone ', content: '  Be brief.\n' });
    expect(response.statusCode).toBe(201);
    const body = response.json();
    expect(Object.keys(body).sort()).toEqual(['content', 'createdAt', 'id', 'projectId', 'title', 'updatedAt']);
    // The title is a label and is trimmed; the content goes to the model exactly as written.
    expect(body).toMatchObject({ projectId: project.id, title: 'Tone', content: '  Be brief.\n' });
    expect(body.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7/);
    expect(body.updatedAt).toBe(body.createdAt);
    expect(response.headers.location).toBe(`/api/v1/projects/${project.id}/prompts/${body.id}`);
    expect((await t.app.inject({ method: 'GET', url: response.headers.location!, headers: user.auth })).json()).toEqual(body);
  });

  it('accepts 200 and 100,000 characters written as JSON escapes of 12 bytes each (Python’s default), 1.2 MB', async () => {
    // JSON.stringify writes an emoji as it is (4 bytes); json.dumps as a pair of \u escapes.
    const escaped = (text: string) => text.replace(/[\u{10000}-\u{10ffff}]/gu, (c) => c.split('').map((unit) => `\\u${unit.charCodeAt(0).toString(16)}`).join(''));
    const body = { title: '😀'.repeat(200), content: '🙂'.repeat(100_000) };
    const payload = escaped(JSON.stringify(body));
    expect(payload.length).toBeGreaterThan(1_200_000);
    const response = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/prompts`, headers: { ...user.auth, 'content-type': 'application/json' }, payload });
    expect(response.statusCode).toBe(201);
    expect(response.json()).toMatchObject(body);
  });

  it('accepts a title of 200 and a content of 100,000 characters', async () => {
    const body = { title: 't'.repeat(200), content: 'c'.repeat(100_000) };
    expect(await createPrompt(t.app, user, project.id, body)).toMatchObject(body);
  });

  it('lists the project’s prompts oldest first, and no other project’s', async () => {
    const own = await createProject(t.app, user);
    const elsewhere = await createProject(t.app, user);
    await createPrompt(t.app, user, elsewhere.id);
    const created = [];
    for (const title of ['first', 'second', 'third']) created.push(await createPrompt(t.app, user, own.id, { title }));
    expect((await request('GET', '', undefined, own.id)).json()).toEqual({ data: created, nextCursor: null });
  });

  it('lists a create after the newest prompts deleted, to a walk that had reached them, when the clock is behind them', async () => {
    const own = await createProject(t.app, user);
    await expectCreateListedAfterDeletedNewest({
      app: t.app,
      headers: user.auth,
      list: `/api/v1/projects/${own.id}/prompts`,
      insertAhead: async () => {
        const id = uuidv7({ msecs: Date.now() + 3_600_000 });
        await t.testDb.database.db.insert(prompts).values({ id, projectId: own.id, title: 'ahead', content: 'c' });
        return id;
      },
      create: () => ({ payload: { title: 'new', content: 'c' } }),
    });
  });

  it.skipIf(!process.env.TEST_DATABASE_URL)('lists a create that waited for its project after what was stored meanwhile (PostgreSQL: concurrent connections)', async () => {
    const own = await createProject(t.app, user);
    await expectWaitingCreateListedLast({
      app: t.app,
      headers: user.auth,
      list: `/api/v1/projects/${own.id}/prompts`,
      url: t.testDb.url!,
      table: 'prompts',
      column: 'title',
      create: (title) => ({ payload: { title, content: 'c' } }),
      parent: { table: 'projects', id: own.id },
      insertRow: `insert into prompts (id, project_id, title, content) values ($1, $2, 'other', 'c')`,
    });
  });

  it('answers a prompt of another project of the same user with 404', async () => {
    const other = await createProject(t.app, user);
    const prompt = await createPrompt(t.app, user, other.id);
    for (const [method, payload] of [['GET'], ['PATCH', { title: 'x' }], ['DELETE']] as const) {
      const body = expectProblem(await request(method, `/${prompt.id}`, payload), 404, 'NOT_FOUND');
      expect(body.detail).toBe('Prompt not found');
    }
    expect((await request('GET', `/${prompt.id}`, undefined, other.id)).json()).toEqual(prompt);
  });

  it('gives times that agree with the list order though the clock of the instance is behind', async () => {
    const own = await createProject(t.app, user);
    await expectTimesInListOrder({ app: t.app, headers: user.auth, list: `/api/v1/projects/${own.id}/prompts`, create: { title: 't', content: 'c' }, change: { content: 'd' } });
  });
});

describe('update and delete', () => {
  it('changes only the fields given and moves updatedAt', async () => {
    const prompt = await createPrompt(t.app, user, project.id, { title: 'Old', content: 'Old content' });
    await new Promise((resolve) => setTimeout(resolve, 5));
    const body = (await request('PATCH', `/${prompt.id}`, { content: 'New content' })).json();
    expect(body).toMatchObject({ id: prompt.id, projectId: project.id, title: 'Old', content: 'New content', createdAt: prompt.createdAt });
    expect(new Date(body.updatedAt).getTime()).toBeGreaterThan(new Date(prompt.updatedAt).getTime());
    expect((await request('PATCH', `/${prompt.id}`, { title: 'New' })).json()).toMatchObject({ title: 'New', content: 'New content' });
  });

  it('deletes a prompt, once', async () => {
    const prompt = await createPrompt(t.app, user, project.id);
    const response = await request('DELETE', `/${prompt.id}`);
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');
    expectProblem(await request('GET', `/${prompt.id}`), 404, 'NOT_FOUND');
    expectProblem(await request('DELETE', `/${prompt.id}`), 404, 'NOT_FOUND');
    expect(await t.testDb.database.db.select().from(prompts).where(eq(prompts.id, prompt.id))).toEqual([]);
  });
});

describe('validation', () => {
  it.each([
    ['no fields', {}, ['body.content', 'body.title']],
    ['an empty title', { title: '', content: 'c' }, ['body.title']],
    ['a blank title', { title: '  ', content: 'c' }, ['body.title']],
    ['a title over 200 characters', { title: 't'.repeat(201), content: 'c' }, ['body.title']],
    ['an empty content', { title: 't', content: '' }, ['body.content']],
    ['a content over 100,000 characters', { title: 't', content: 'c'.repeat(100_001) }, ['body.content']],
    ['fields that are not strings', { title: 1, content: { text: 'c' } }, ['body.content', 'body.title']],
    ['a projectId', { title: 't', content: 'c', projectId: uuidv7() }, ['body']],
    ['an id', { title: 't', content: 'c', id: uuidv7() }, ['body']],
    ['a createdAt', { title: 't', content: 'c', createdAt: '2020-01-01T00:00:00.000Z' }, ['body']],
  ])('POST refuses %s', async (_, payload, paths) => {
    const before = await t.testDb.database.db.$count(prompts);
    expect(errorPaths(expectProblem(await request('POST', '', payload), 400, 'VALIDATION_ERROR'))).toEqual(paths);
    expect(await t.testDb.database.db.$count(prompts)).toBe(before);
  });

  it.each([
    ['an empty body', {}, ['body']],
    ['a null title', { title: null }, ['body.title']],
    ['a title over 200 characters', { title: 't'.repeat(201) }, ['body.title']],
    ['an empty content', { content: '' }, ['body.content']],
    ['a content over 100,000 characters', { content: 'c'.repeat(100_001) }, ['body.content']],
    ['a projectId', { title: 't', projectId: uuidv7() }, ['body']],
    ['an updatedAt', { updatedAt: '2020-01-01T00:00:00.000Z' }, ['body']],
  ])('PATCH refuses %s and changes nothing', async (_, payload, paths) => {
    const prompt = await createPrompt(t.app, user, project.id);
    expect(errorPaths(expectProblem(await request('PATCH', `/${prompt.id}`, payload), 400, 'VALIDATION_ERROR'))).toEqual(paths);
    expect((await request('GET', `/${prompt.id}`)).json()).toEqual(prompt);
  });

  it.each(['not-a-uuid', "1' or '1'='1", `${uuidv7()}0`])('answers a malformed prompt id (%s) with 404', async (id) => {
    const path = `/${encodeURIComponent(id)}`;
    for (const [method, payload] of [['GET'], ['PATCH', { title: 'x' }], ['DELETE']] as const) {
      expectProblem(await request(method, path, payload), 404, 'NOT_FOUND');
    }
  });

  it('answers a malformed or unknown project id with 404 on every route', async () => {
    const prompt = await createPrompt(t.app, user, project.id);
    for (const projectId of ['not-a-uuid', uuidv7()]) {
      expectProblem(await request('POST', '', { title: 't', content: 'c' }, projectId), 404, 'NOT_FOUND');
      expectProblem(await request('GET', '', undefined, projectId), 404, 'NOT_FOUND');
      for (const [method, payload] of [['GET'], ['PATCH', { title: 'x' }], ['DELETE']] as const) {
        expectProblem(await request(method, `/${prompt.id}`, payload, projectId), 404, 'NOT_FOUND');
      }
    }
    expect((await request('GET', `/${prompt.id}`)).json()).toEqual(prompt);
  });
});

describe('MAX_PROMPTS_PER_PROJECT', () => {
  const MAX = 3;
  let limited: TestApp;
  let owner: RegisteredUser;
  beforeAll(async () => {
    limited = await startTestApp({ MAX_PROMPTS_PER_PROJECT: String(MAX) });
    owner = await registerUser(limited.app);
  });
  afterAll(() => limited.close());

  const prompt = (projectId: string, as = owner, method: 'POST' | 'GET' = 'POST') =>
    limited.app.inject({ method, url: `/api/v1/projects/${projectId}/prompts`, headers: as.auth, ...(method === 'POST' ? { payload: { title: 'One more', content: 'c' } } : {}) });
  const holder = (projectId: string): Holder => ({
    max: MAX,
    detail: `This project already has the most prompts it may hold: ${MAX} (MAX_PROMPTS_PER_PROJECT)`,
    create: () => prompt(projectId),
    stored: async () => (await limited.testDb.database.db.select({ id: prompts.id }).from(prompts).where(eq(prompts.projectId, projectId))).length,
  });
  async function projectWith(count: number) {
    const { id } = await createProject(limited.app, owner);
    for (let i = 0; i < count; i++) await createPrompt(limited.app, owner, id);
    return id;
  }

  it('refuses one prompt more with 409 CONFLICT naming the limit, and stores nothing', async () => {
    await expectFull(holder(await projectWith(MAX)));
    // A limit per project: the user's other projects still take prompts.
    expect((await prompt(await projectWith(0))).statusCode).toBe(201);
  });

  it('takes a prompt again once one is deleted', async () => {
    const projectId = await projectWith(MAX);
    const [first] = (await prompt(projectId, owner, 'GET')).json().data;
    await expectDeleteFreesOneSlot(holder(projectId), () =>
      limited.app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}/prompts/${first.id}`, headers: owner.auth }),
    );
  });

  it('answers another user’s full project with 404, as if it did not exist', async () => {
    const projectId = await projectWith(MAX);
    const stranger = await registerUser(limited.app);
    expect(expectProblem(await prompt(projectId, stranger), 404, 'NOT_FOUND').detail).toBe('Project not found');
    expect(await holder(projectId).stored()).toBe(MAX);
  });

  it('stores exactly one of many creates at once into the last slot', async () => {
    await expectOneOfManyIntoTheLastSlot(holder(await projectWith(MAX - 1)));
  });

  it.skipIf(!process.env.TEST_DATABASE_URL)('still stores exactly one when each create holds its lock a while (PostgreSQL: concurrent connections)', async () => {
    // Each insert sleeps before its commit: the other creates start meanwhile, their statements' snapshots
    // taken before it commits. A count made with such a snapshot, not after the lock, lets them all in.
    const db = limited.testDb.database.db;
    await db.execute(
      sql.raw(`create function test_pause() returns trigger language plpgsql as $$ begin perform pg_sleep(0.1); return null; end $$;
        create trigger test_pause after insert on prompts for each statement execute function test_pause();`),
    );
    try {
      await expectOneOfManyIntoTheLastSlot(holder(await projectWith(MAX - 1)));
    } finally {
      await db.execute(sql.raw('drop trigger test_pause on prompts; drop function test_pause();'));
    }
  });
});
