import { eq } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { messages } from '../../src/db/schema.js';
import { createProject, expectProblem, insertMessages, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';

let t: TestApp;
let user: RegisteredUser;
beforeAll(async () => {
  t = await startTestApp();
  user = await registerUser(t.app);
});
afterAll(() => t.close());

const history = (projectId: string, query = '') =>
  t.app.inject({ method: 'GET', url: `/api/v1/projects/${projectId}/messages${query}`, headers: user.auth });
const clear = (projectId: string) =>
  t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}/messages`, headers: user.auth });

describe('history', () => {
  it('is empty for a new project', async () => {
    const project = await createProject(t.app, user);
    expect((await history(project.id)).json()).toEqual({ data: [], nextCursor: null });
  });

  it('lists the messages in the shape of the contract, with usage from the token counts', async () => {
    const project = await createProject(t.app, user);
    const [question] = await insertMessages(t.testDb.database.db, project.id, 1, { content: 'Hi?' });
    const [answer] = await insertMessages(t.testDb.database.db, project.id, 1, {
      role: 'assistant',
      content: 'Hello!',
      model: 'gpt-4o-mini',
      promptTokens: 12,
      completionTokens: 3,
      totalTokens: 15,
    });
    const [cut] = await insertMessages(t.testDb.database.db, project.id, 1, { role: 'assistant', content: 'Hel', status: 'incomplete' });

    expect((await history(project.id)).json()).toEqual({
      data: [
        { id: question!.id, projectId: project.id, role: 'user', content: 'Hi?', status: 'complete', model: null, usage: null, createdAt: question!.createdAt.toISOString() },
        {
          id: answer!.id,
          projectId: project.id,
          role: 'assistant',
          content: 'Hello!',
          status: 'complete',
          model: 'gpt-4o-mini',
          usage: { promptTokens: 12, completionTokens: 3, totalTokens: 15 },
          createdAt: answer!.createdAt.toISOString(),
        },
        { id: cut!.id, projectId: project.id, role: 'assistant', content: 'Hel', status: 'incomplete', model: null, usage: null, createdAt: cut!.createdAt.toISOString() },
      ],
      nextCursor: null,
    });
  });

  it('orders by creation time, then id', async () => {
    const project = await createProject(t.app, user);
    const { db } = t.testDb.database;
    // Ids made in one order, written with times in another: the time decides.
    const [late] = await insertMessages(db, project.id, 1, { content: 'late', createdAt: new Date('2030-01-01T00:00:02Z') });
    const [early] = await insertMessages(db, project.id, 1, { content: 'early', createdAt: new Date('2030-01-01T00:00:01Z') });
    const sameTime = await insertMessages(db, project.id, 3, { createdAt: new Date('2030-01-01T00:00:01.500Z') });
    const ids = (await history(project.id)).json().data.map((m: { id: string }) => m.id);
    expect(ids).toEqual([early!.id, ...sameTime.map((m) => m.id), late!.id]);
  });

  it('shows only the project’s own messages', async () => {
    const [one, two] = [await createProject(t.app, user), await createProject(t.app, user)];
    await insertMessages(t.testDb.database.db, one.id, 2);
    const [own] = await insertMessages(t.testDb.database.db, two.id, 1);
    expect((await history(two.id)).json().data.map((m: { id: string }) => m.id)).toEqual([own!.id]);
  });
});

describe('clear', () => {
  it('deletes the project’s history and nothing else', async () => {
    const [cleared, kept] = [await createProject(t.app, user), await createProject(t.app, user)];
    await insertMessages(t.testDb.database.db, cleared.id, 4);
    await insertMessages(t.testDb.database.db, kept.id, 2);

    const response = await clear(cleared.id);
    expect(response.statusCode).toBe(204);
    expect(response.body).toBe('');
    expect((await history(cleared.id)).json()).toEqual({ data: [], nextCursor: null });
    expect(await t.testDb.database.db.select().from(messages).where(eq(messages.projectId, kept.id))).toHaveLength(2);
    const project = await t.app.inject({ method: 'GET', url: `/api/v1/projects/${cleared.id}`, headers: user.auth });
    expect(project.json().counts.messages).toBe(0);
  });

  it('clears an empty history too', async () => {
    const project = await createProject(t.app, user);
    expect((await clear(project.id)).statusCode).toBe(204);
  });
});

describe('errors', () => {
  it.each(['not-a-uuid', "1' or '1'='1", uuidv7()])('answers project id %s with 404', async (projectId) => {
    const path = encodeURIComponent(projectId);
    for (const response of [await history(path), await clear(path)]) {
      expect(expectProblem(response, 404, 'NOT_FOUND').detail).toBe('Project not found');
    }
  });

  it('refuses an unknown query parameter', async () => {
    const project = await createProject(t.app, user);
    const body = expectProblem(await history(project.id, '?order=desc'), 400, 'VALIDATION_ERROR');
    expect(body.errors).toEqual([expect.objectContaining({ path: 'querystring' })]);
  });
});
