import { eq, inArray } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { files, messages, projects, prompts } from '../../src/db/schema.js';
import { createProject, createPrompt, expectProblem, insertMessages, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';
import { expectDeleteFreesOneSlot, expectFull, expectOneOfManyIntoTheLastSlot, type Holder } from '../support/limits.js';
import { expectTimesInListOrder } from '../support/clock-behind.js';
import { expectCreateListedAfterDeletedNewest } from '../support/deleted-newest.js';
import { expectWaitingCreateListedLast } from '../support/waiting-create.js';

let t: TestApp;
let user: RegisteredUser;
beforeAll(async () => {
  t = await startTestApp();
  user = await registerUser(t.app);
});
afterAll(() => t.close());

const request = (method: 'GET' | 'POST' | 'PATCH' | 'DELETE', path: string, payload?: unknown, as = user) =>
  t.app.inject({ method, url: `/api/v1/projects${path}`, headers: as.auth, ...(payload === undefined ? {} : { payload: payload as object }) });

async function insertFile(projectId: string) {
  await t.testDb.database.db.insert(files).values({
    id: uuidv7(),
    projectId,
    filename: 'notes.txt',
    mimeType: 'text/plain',
    size: 5,
    sha256: '0'.repeat(64),
    storageUrl: `file:///tmp/${uuidv7()}`,
  });
}

describe('create', () => {
  it('creates a project with server defaults and zero counts', async () => {
    const response = await request('POST', '', { name: '  Support bot  ' });
    expect(response.statusCode).toBe(201);
    const body = response.json();
    expect(Object.keys(body).sort()).toEqual(['counts', 'createdAt', 'description', 'id', 'model', 'name', 'provider', 'updatedAt']);
    expect(body).toMatchObject({ name: 'Support bot', description: null, provider: null, model: null });
    expect(body.counts).toEqual({ prompts: 0, messages: 0, files: 0 });
    expect(body.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7/);
    expect(new Date(body.createdAt).toISOString()).toBe(body.createdAt);
    expect(body.updatedAt).toBe(body.createdAt);
    // RFC 9110 §15.3.2: without Location, a 201 says that it made the request's own URL.
    expect(response.headers.location).toBe(`/api/v1/projects/${body.id}`);
    expect((await t.app.inject({ method: 'GET', url: response.headers.location!, headers: user.auth })).json()).toEqual(body);
    const [row] = await t.testDb.database.db.select().from(projects).where(eq(projects.id, body.id));
    expect(row!.userId).toBe(user.id);
  });

  it('keeps a description, a provider and a model', async () => {
    const body = { name: 'Research', description: 'Reads papers', provider: 'openrouter', model: 'meta-llama/llama-3-8b' };
    expect(await createProject(t.app, user, body)).toMatchObject(body);
  });

  it('accepts every field at its longest', async () => {
    const body = { name: 'n'.repeat(200), description: 'd'.repeat(2000), provider: 'openai', model: 'm'.repeat(200) };
    expect(await createProject(t.app, user, body)).toMatchObject(body);
  });
});

describe('validation', () => {
  it.each([
    ['no body fields', {}, ['body.name']],
    ['an empty name', { name: '' }, ['body.name']],
    ['a blank name', { name: '   ' }, ['body.name']],
    ['a name over 200 characters', { name: 'n'.repeat(201) }, ['body.name']],
    ['a name that is not a string', { name: 42 }, ['body.name']],
    ['a null name', { name: null }, ['body.name']],
    ['a description over 2000 characters', { name: 'P', description: 'd'.repeat(2001) }, ['body.description']],
    ['a description that is not a string', { name: 'P', description: ['x'] }, ['body.description']],
    ['an unknown provider', { name: 'P', provider: 'anthropic' }, ['body.provider']],
    ['an empty model', { name: 'P', model: '' }, ['body.model']],
    ['a model over 200 characters', { name: 'P', model: 'm'.repeat(201) }, ['body.model']],
    ['a userId', { name: 'P', userId: uuidv7() }, ['body']],
    ['an id', { name: 'P', id: uuidv7() }, ['body']],
    ['a createdAt', { name: 'P', createdAt: '2020-01-01T00:00:00.000Z' }, ['body']],
    ['counts', { name: 'P', counts: { prompts: 9 } }, ['body']],
  ])('POST refuses %s', async (_, payload, paths) => {
    const before = await t.testDb.database.db.$count(projects);
    const body = expectProblem(await request('POST', '', payload), 400, 'VALIDATION_ERROR');
    expect([...new Set((body.errors as { path: string }[]).map((e) => e.path))].sort()).toEqual(paths);
    expect(await t.testDb.database.db.$count(projects)).toBe(before);
  });

  it.each([
    ['an empty body', {}, ['body']],
    ['an empty name', { name: '' }, ['body.name']],
    ['a null name', { name: null }, ['body.name']],
    ['a name over 200 characters', { name: 'n'.repeat(201) }, ['body.name']],
    ['a description over 2000 characters', { description: 'd'.repeat(2001) }, ['body.description']],
    ['an unknown provider', { provider: 'OPENAI' }, ['body.provider']],
    ['a blank model', { model: '  ' }, ['body.model']],
    ['a userId', { userId: uuidv7() }, ['body']],
    ['an id', { id: uuidv7() }, ['body']],
    ['an updatedAt', { name: 'P', updatedAt: '2020-01-01T00:00:00.000Z' }, ['body']],
  ])('PATCH refuses %s and changes nothing', async (_, payload, paths) => {
    const project = await createProject(t.app, user);
    const body = expectProblem(await request('PATCH', `/${project.id}`, payload), 400, 'VALIDATION_ERROR');
    expect([...new Set((body.errors as { path: string }[]).map((e) => e.path))].sort()).toEqual(paths);
    expect((await request('GET', `/${project.id}`)).json()).toEqual(project);
  });

  it('refuses a PATCH without a body', async () => {
    const project = await createProject(t.app, user);
    expectProblem(await request('PATCH', `/${project.id}`), 400, 'VALIDATION_ERROR');
  });

  it.each(['not-a-uuid', '123', "1' or '1'='1", '0190a0a0-0000-7000-8000-00000000000', `${uuidv7()}x`, '%00', 'x'.repeat(300)])(
    'answers a malformed id (%s) with 404 on every method, its detail naming nothing of it',
    async (id) => {
      const path = `/${encodeURIComponent(id)}`;
      for (const [method, payload] of [['GET'], ['PATCH', { name: 'x' }], ['DELETE']] as const) {
        const { detail } = expectProblem(await request(method, path, payload), 404, 'NOT_FOUND');
        expect(['Project not found', 'Resource not found']).toContain(detail);
      }
    },
  );

  it('answers an unknown id with 404 on every method', async () => {
    const path = `/${uuidv7()}`;
    for (const [method, payload] of [['GET'], ['PATCH', { name: 'x' }], ['DELETE']] as const) {
      const body = expectProblem(await request(method, path, payload), 404, 'NOT_FOUND');
      expect(body.detail).toBe('Project not found');
    }
  });

  it('needs a token', async () => {
    expectProblem(await t.app.inject({ method: 'GET', url: '/api/v1/projects' }), 401, 'UNAUTHORIZED');
    expectProblem(await t.app.inject({ method: 'POST', url: '/api/v1/projects', payload: { name: 'P' } }), 401, 'UNAUTHORIZED');
  });
});

describe('get and list', () => {
  it('counts prompts, messages and files of each project on its own', async () => {
    const owner = await registerUser(t.app);
    const [busy, quiet] = [await createProject(t.app, owner, { name: 'busy' }), await createProject(t.app, owner, { name: 'quiet' })];
    await createPrompt(t.app, owner, busy.id);
    await createPrompt(t.app, owner, busy.id);
    await insertMessages(t.testDb.database.db, busy.id, 3);
    await insertFile(busy.id);
    await insertMessages(t.testDb.database.db, quiet.id, 1);

    const got = (await request('GET', `/${busy.id}`, undefined, owner)).json();
    expect(got.counts).toEqual({ prompts: 2, messages: 3, files: 1 });
    const listed = (await request('GET', '', undefined, owner)).json();
    expect(listed.data.map((p: { name: string; counts: unknown }) => [p.name, p.counts])).toEqual([
      ['busy', { prompts: 2, messages: 3, files: 1 }],
      ['quiet', { prompts: 0, messages: 1, files: 0 }],
    ]);
  });

  it('lists only the caller’s projects, oldest first, 20 by default', async () => {
    const owner = await registerUser(t.app);
    const other = await registerUser(t.app);
    await createProject(t.app, other);
    const created = [];
    for (let i = 0; i < 21; i++) created.push(await createProject(t.app, owner, { name: `p${i}` }));

    const first = (await request('GET', '', undefined, owner)).json();
    expect(first.data).toHaveLength(20);
    expect(first.data).toEqual(created.slice(0, 20));
    expect(first.nextCursor).toEqual(expect.any(String));
    const second = (await request('GET', `?cursor=${first.nextCursor}`, undefined, owner)).json();
    expect(second).toEqual({ data: created.slice(20), nextCursor: null });
  });

  it('answers a path with a slash at its end as the path without it, on every route', async () => {
    const owner = await registerUser(t.app);
    const project = await createProject(t.app, owner);
    const prompt = await createPrompt(t.app, owner, project.id);
    const get = (url: string) => t.app.inject({ method: 'GET', url, headers: owner.auth });
    for (const path of ['/api/v1/projects', `/api/v1/projects/${project.id}`, `/api/v1/projects/${project.id}/prompts/${prompt.id}`, '/api/v1/auth/me', '/health/live']) {
      const [without, withSlash] = [await get(path), await get(`${path}/`)];
      expect(withSlash.statusCode, path).toBe(200);
      expect(withSlash.json(), path).toEqual(without.json());
    }
    expect((await t.app.inject({ method: 'PATCH', url: `/api/v1/projects/${project.id}/`, headers: owner.auth, payload: { name: 'renamed' } })).json().name).toBe('renamed');
    // Not another path: one slash, at the end, and only there.
    expectProblem(await get(`/api/v1/projects/${project.id}//`), 404, 'NOT_FOUND');
  });

  it('lists nothing for a new user', async () => {
    const fresh = await registerUser(t.app);
    expect((await request('GET', '', undefined, fresh)).json()).toEqual({ data: [], nextCursor: null });
  });

  it('gives times that agree with the list order though the clock of the instance is behind', async () => {
    const owner = await registerUser(t.app);
    await expectTimesInListOrder({ app: t.app, headers: owner.auth, list: '/api/v1/projects', create: { name: 'p' }, change: { name: 'q' } });
  });

  it('lists a create after the newest projects deleted, to a walk that had reached them, when the clock is behind them', async () => {
    const owner = await registerUser(t.app);
    await expectCreateListedAfterDeletedNewest({
      app: t.app,
      headers: owner.auth,
      list: '/api/v1/projects',
      insertAhead: async () => {
        const id = uuidv7({ msecs: Date.now() + 3_600_000 });
        await t.testDb.database.db.insert(projects).values({ id, userId: owner.id, name: 'ahead' });
        return id;
      },
      create: () => ({ payload: { name: 'new' } }),
    });
  });

  it.skipIf(!process.env.TEST_DATABASE_URL)('lists a create that waited for its account after what was stored meanwhile (PostgreSQL: concurrent connections)', async () => {
    const owner = await registerUser(t.app);
    await expectWaitingCreateListedLast({
      app: t.app,
      headers: owner.auth,
      list: '/api/v1/projects',
      url: t.testDb.url!,
      table: 'projects',
      column: 'name',
      create: (name) => ({ payload: { name } }),
      parent: { table: 'users', id: owner.id },
      insertRow: `insert into projects (id, user_id, name) values ($1, $2, 'other')`,
    });
  });
});

describe('update', () => {
  it('changes only the fields given and moves updatedAt', async () => {
    const project = await createProject(t.app, user, { name: 'Before', description: 'kept', provider: 'openai', model: 'gpt-4o' });
    await new Promise((resolve) => setTimeout(resolve, 5));
    const response = await request('PATCH', `/${project.id}`, { name: '  After ' });
    expect(response.statusCode).toBe(200);
    const body = response.json();
    expect(body).toMatchObject({ id: project.id, name: 'After', description: 'kept', provider: 'openai', model: 'gpt-4o' });
    expect(body.createdAt).toBe(project.createdAt);
    expect(new Date(body.updatedAt).getTime()).toBeGreaterThan(new Date(project.updatedAt).getTime());
    expect((await request('GET', `/${project.id}`)).json()).toEqual(body);
  });

  it('resets description, provider and model with null', async () => {
    const project = await createProject(t.app, user, { description: 'd', provider: 'openrouter', model: 'x/y' });
    const body = (await request('PATCH', `/${project.id}`, { description: null, provider: null, model: null })).json();
    expect(body).toMatchObject({ name: project.name, description: null, provider: null, model: null });
  });

  it('answers with the current counts', async () => {
    const project = await createProject(t.app, user);
    await createPrompt(t.app, user, project.id);
    await insertMessages(t.testDb.database.db, project.id, 2);
    expect((await request('PATCH', `/${project.id}`, { model: 'gpt-4o-mini' })).json().counts).toEqual({ prompts: 1, messages: 2, files: 0 });
  });
});

describe('delete', () => {
  it('deletes the project and everything under it, and nothing else', async () => {
    const { db } = t.testDb.database;
    const [doomed, kept] = [await createProject(t.app, user), await createProject(t.app, user)];
    for (const project of [doomed, kept]) {
      await createPrompt(t.app, user, project.id);
      await insertMessages(db, project.id, 2);
      await insertFile(project.id);
    }

    const response = await request('DELETE', `/${doomed.id}`);
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');
    expectProblem(await request('GET', `/${doomed.id}`), 404, 'NOT_FOUND');
    expectProblem(await request('DELETE', `/${doomed.id}`), 404, 'NOT_FOUND');

    const ids = [doomed.id, kept.id];
    for (const table of [prompts, messages, files]) {
      const left = await db.select({ projectId: table.projectId }).from(table).where(inArray(table.projectId, ids));
      expect(new Set(left.map((row) => row.projectId))).toEqual(new Set([kept.id]));
    }
    expect((await request('GET', `/${kept.id}`)).json().counts).toEqual({ prompts: 1, messages: 2, files: 1 });
  });
});

describe('MAX_PROJECTS_PER_USER', () => {
  const MAX = 3;
  let limited: TestApp;
  beforeAll(async () => {
    limited = await startTestApp({ MAX_PROJECTS_PER_USER: String(MAX) });
  });
  afterAll(() => limited.close());

  const holder = (owner: RegisteredUser): Holder => ({
    max: MAX,
    detail: `This account already has the most projects it may hold: ${MAX} (MAX_PROJECTS_PER_USER)`,
    create: () => limited.app.inject({ method: 'POST', url: '/api/v1/projects', headers: owner.auth, payload: { name: 'One more' } }),
    stored: async () => (await limited.testDb.database.db.select({ id: projects.id }).from(projects).where(eq(projects.userId, owner.id))).length,
  });
  async function userWith(count: number) {
    const owner = await registerUser(limited.app);
    for (let i = 0; i < count; i++) await createProject(limited.app, owner);
    return owner;
  }

  it('refuses one project more with 409 CONFLICT naming the limit, and stores nothing', async () => {
    await expectFull(holder(await userWith(MAX)));
    // A limit per user: another one still creates.
    expect((await holder(await userWith(0)).create()).statusCode).toBe(201);
  });

  it('takes a project again once one is deleted', async () => {
    const owner = await userWith(MAX);
    const [first] = (await limited.app.inject({ method: 'GET', url: '/api/v1/projects', headers: owner.auth })).json().data;
    await expectDeleteFreesOneSlot(holder(owner), () => limited.app.inject({ method: 'DELETE', url: `/api/v1/projects/${first.id}`, headers: owner.auth }));
  });

  it('stores exactly one of many creates at once into the last slot', async () => {
    await expectOneOfManyIntoTheLastSlot(holder(await userWith(MAX - 1)));
  });
});
