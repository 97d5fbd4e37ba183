import { sql } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { messages } from '../../src/db/schema.js';
import { encodeCursor } from '../../src/http/pagination.js';
import type { ProjectDto } from '../../src/modules/projects/schemas.js';
import { createProject, createPrompt, expectProblem, insertMessages, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';

let t: TestApp;
let user: RegisteredUser;
let project: ProjectDto;
beforeAll(async () => {
  t = await startTestApp();
  user = await registerUser(t.app);
  project = await createProject(t.app, user);
  await insertMessages(t.testDb.database.db, project.id, 2);
});
afterAll(() => t.close());

const get = (url: string, as = user) => t.app.inject({ method: 'GET', url, headers: as.auth });

/**
 * Follows nextCursor from the first page to the last, `limit` items a page. After each of the first
 * pages `add` writes new items and returns their ids; then the list stops growing and the walk must end.
 */
async function walk(as: RegisteredUser, url: string, limit: number, add: () => Promise<string[]>) {
  const seen: string[] = [];
  const added: string[] = [];
  let cursor: string | null = null;
  for (let pages = 1; ; pages++) {
    expect(pages, 'the walk never ends').toBeLessThan(50);
    const response = await get(`${url}?limit=${limit}${cursor ? `&cursor=${cursor}` : ''}`, as);
    expect(response.statusCode, response.body).toBe(200);
    const page = response.json() as { data: { id: string }[]; nextCursor: string | null };
    expect(page.data.length).toBeLessThanOrEqual(limit);
    seen.push(...page.data.map((item) => item.id));
    cursor = page.nextCursor;
    if (!cursor) return { seen, added };
    if (pages <= 4) added.push(...(await add()));
  }
}

describe('walking a list while items are added', () => {
  it.each([1, 2, 3])('projects, %i a page', async (limit) => {
    const owner = await registerUser(t.app);
    const existing = [];
    for (let i = 0; i < 7; i++) existing.push((await createProject(t.app, owner)).id);
    const { seen, added } = await walk(owner, '/api/v1/projects', limit, async () => [(await createProject(t.app, owner)).id]);
    // Every item exactly once, oldest first; what was added while walking comes after, being newer.
    expect(seen).toEqual([...existing, ...added]);
  });

  it.each([1, 2, 3])('prompts, %i a page', async (limit) => {
    const owned = await createProject(t.app, user);
    const existing = [];
    for (let i = 0; i < 7; i++) existing.push((await createPrompt(t.app, user, owned.id)).id);
    const { seen, added } = await walk(user, `/api/v1/projects/${owned.id}/prompts`, limit, async () => [
      (await createPrompt(t.app, user, owned.id)).id,
    ]);
    expect(seen).toEqual([...existing, ...added]);
  });

  it.each([1, 2, 3])('messages, %i a page, several written in the same instant', async (limit) => {
    const owned = await createProject(t.app, user);
    const { db } = t.testDb.database;
    // One statement: every row gets the same now(), so the id alone orders them.
    const existing = (await insertMessages(db, owned.id, 7)).map((m) => m.id);
    const { seen, added } = await walk(user, `/api/v1/projects/${owned.id}/messages`, limit, async () =>
      (await insertMessages(db, owned.id, 2)).map((m) => m.id),
    );
    expect(seen).toEqual([...existing, ...added]);
  });

  it('messages whose times differ by microseconds within one millisecond', async () => {
    const owned = await createProject(t.app, user);
    // Written newest id first, so that only the time, to the microsecond, gives the order.
    const rows = [3, 2, 1].map((micros) => ({
      id: uuidv7(),
      projectId: owned.id,
      role: 'user' as const,
      content: `at ${micros} µs`,
      status: 'complete' as const,
      createdAt: sql`timestamptz '2030-01-01 00:00:00.000000+00' + ${micros} * interval '1 microsecond'`,
    }));
    await t.testDb.database.db.insert(messages).values(rows);
    const { seen } = await walk(user, `/api/v1/projects/${owned.id}/messages`, 1, async () => []);
    expect(seen).toEqual(rows.map((row) => row.id).reverse());
  });
});

describe('limit', () => {
  const lists = () => ['/api/v1/projects', `/api/v1/projects/${project.id}/prompts`, `/api/v1/projects/${project.id}/messages`];

  it.each(['0', '101', 'abc', '1.5', '-1', '', '1e1', '0x10', ' 5', '1000'])('refuses limit=%j on every list', async (limit) => {
    for (const url of lists()) {
      const body = expectProblem(await get(`${url}?limit=${encodeURIComponent(limit)}`), 400, 'VALIDATION_ERROR');
      expect(body.errors).toEqual([expect.objectContaining({ path: 'querystring.limit' })]);
    }
  });

  it('refuses a repeated limit', async () => {
    expectProblem(await get('/api/v1/projects?limit=1&limit=2'), 400, 'VALIDATION_ERROR');
  });

  it('takes 1 to 100, and 20 without one', async () => {
    const owner = await registerUser(t.app);
    for (let i = 0; i < 101; i++) await createProject(t.app, owner);
    const sizes = async (query: string) => (await get(`/api/v1/projects${query}`, owner)).json().data.length;
    expect([await sizes(''), await sizes('?limit=1'), await sizes('?limit=100'), await sizes('?limit=007')]).toEqual([20, 1, 100, 7]);
  });
});

describe('cursor', () => {
  const base64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');

  it.each([
    ['garbage', 'not a cursor!'],
    ['base64 of text', Buffer.from('hello').toString('base64url')],
    ['an object', base64({ id: uuidv7() })],
    ['a number', base64([1])],
    ['an id that is not a uuid', base64(['1; drop table projects'])],
    ['too many parts', base64([uuidv7(), uuidv7()])],
    ['a messages cursor', base64(['1893456000000000', uuidv7()])],
    ['an empty array', base64([])],
    ['an over-long cursor', base64(['x'.repeat(600)])],
  ])('refuses %s on an id-ordered list', async (_, cursor) => {
    for (const url of ['/api/v1/projects', `/api/v1/projects/${project.id}/prompts`]) {
      const body = expectProblem(await get(`${url}?cursor=${encodeURIComponent(cursor)}`), 400, 'VALIDATION_ERROR');
      expect(body.errors).toEqual([expect.objectContaining({ path: 'querystring.cursor' })]);
    }
  });

  it.each([
    ['garbage', '%%%'],
    ['a projects cursor', base64([uuidv7()])],
    ['a time that is not a number', base64(['2030-01-01T00:00:00Z', uuidv7()])],
    ['a time out of range', base64(['99999999999999999999', uuidv7()])],
    ['a fractional time', base64(['1.5', uuidv7()])],
    ['a time as a JSON number', base64([1893456000000000, uuidv7()])],
    ['an id that is not a uuid', base64(['1893456000000000', 'x'])],
  ])('refuses %s on the message history', async (_, cursor) => {
    const url = `/api/v1/projects/${project.id}/messages?cursor=${encodeURIComponent(cursor)}`;
    const body = expectProblem(await get(url), 400, 'VALIDATION_ERROR');
    expect(body.errors).toEqual([expect.objectContaining({ path: 'querystring.cursor' })]);
  });

  it('accepts any well-formed sort key of the list, even one no page handed out', async () => {
    const far = encodeCursor(`projects:${user.id}`, ['ffffffff-ffff-7fff-bfff-ffffffffffff']);
    expect((await get(`/api/v1/projects?cursor=${far}`)).json()).toEqual({ data: [], nextCursor: null });
    const early = encodeCursor(`messages:${project.id}`, ['-9999999999999999', '00000000-0000-7000-8000-000000000000']);
    expect((await get(`/api/v1/projects/${project.id}/messages?cursor=${early}`)).json().data).toHaveLength(2);
  });

  it("refuses a cursor of another list, which would skip this list's rows without a word: another project's, user's or kind", async () => {
    const other = await createProject(t.app, user);
    for (let i = 0; i < 2; i++) await createPrompt(t.app, user, other.id);
    await createPrompt(t.app, user, project.id);
    const cursorOf = async (url: string) => (await get(`${url}?limit=1`)).json().nextCursor as string;
    const otherPrompts = await cursorOf(`/api/v1/projects/${other.id}/prompts`);
    const secondUser = await registerUser(t.app);
    for (let i = 0; i < 2; i++) await createProject(t.app, secondUser);
    const refusals = [
      [`/api/v1/projects/${project.id}/prompts`, otherPrompts],
      ['/api/v1/projects', otherPrompts],
      ['/api/v1/projects', (await get('/api/v1/projects?limit=1', secondUser)).json().nextCursor as string],
      [`/api/v1/projects/${project.id}/files`, await cursorOf(`/api/v1/projects/${project.id}/messages`)],
    ];
    for (const [url, cursor] of refusals) {
      const body = expectProblem(await get(`${url}?cursor=${cursor}`), 400, 'VALIDATION_ERROR');
      expect(body.errors, url).toEqual([{ path: 'querystring.cursor', message: 'is not a cursor of this list' }]);
    }
    // Its own list takes it, its project named in capitals or not.
    const own = await get(`/api/v1/projects/${other.id.toUpperCase()}/prompts?cursor=${otherPrompts}`);
    expect(own.json().data).toHaveLength(1);
  });

  it('refuses an unknown query parameter on every list', async () => {
    for (const url of ['/api/v1/projects', `/api/v1/projects/${project.id}/prompts`, `/api/v1/projects/${project.id}/messages`]) {
      const body = expectProblem(await get(`${url}?offset=20`), 400, 'VALIDATION_ERROR');
      expect(body.errors).toEqual([expect.objectContaining({ path: 'querystring' })]);
    }
  });
});
