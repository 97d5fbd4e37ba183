import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { files } from '../../src/db/schema.js';
import { encodeCursor } from '../../src/http/pagination.js';
import { createProject, createPrompt, expectProblem, insertMessages, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';
import { type Method, type OwnedIds, ownedRoutes, projectRows } from '../support/routes.js';

let t: TestApp;
let a: RegisteredUser;
let b: RegisteredUser;
let ids: OwnedIds;
beforeAll(async () => {
  t = await startTestApp();
  [a, b] = [await registerUser(t.app), await registerUser(t.app)];
  const project = await createProject(t.app, a, { name: 'A’s secret project', description: 'private', provider: 'openai', model: 'gpt-4o' });
  const prompt = await createPrompt(t.app, a, project.id, { title: 'A’s prompt', content: 'secret instructions' });
  await createPrompt(t.app, a, project.id);
  await insertMessages(t.testDb.database.db, project.id, 3);
  const [file] = await t.testDb.database.db
    .insert(files)
    .values({
      id: uuidv7(),
      projectId: project.id,
      filename: 'a.txt',
      mimeType: 'text/plain',
      size: 1,
      sha256: 'f'.repeat(64),
      storageUrl: 'file:///tmp/a.txt',
    })
    .returning();
  const ownProject = await createProject(t.app, b, { name: 'B’s project' });
  ids = { project: project.id, prompt: prompt.id, file: file!.id, ownProject: ownProject.id };
});
afterAll(() => t.close());

const everything = () => projectRows(t.testDb.database.db);

const call = (as: RegisteredUser, method: Method, url: string, body?: object) =>
  t.app.inject({ method, url, headers: as.auth, ...(body ? { payload: body } : {}) });

describe('user B against user A’s ids', () => {
  it.each(ownedRoutes)('%s (%s): 404 as if it did not exist, and nothing changes', async (_, method, path, body) => {
    const before = await everything();

    const response = await call(b, method, path(ids), body);
    const problem = expectProblem(response, 404, 'NOT_FOUND');
    expect(response.body).not.toMatch(/secret|A’s/);

    expect(await everything()).toEqual(before);
    // The same answer as for ids that name nothing at all: not even existence leaks.
    const missing = { project: uuidv7(), prompt: uuidv7(), file: uuidv7(), ownProject: ids.ownProject };
    const absent = expectProblem(await call(b, method, path(missing), body), 404, 'NOT_FOUND');
    expect(problem.detail).toBe(absent.detail);
  });

  it('leaves A able to use all of it afterwards', async () => {
    const project = await call(a, 'GET', `/api/v1/projects/${ids.project}`);
    expect(project.json()).toMatchObject({ name: 'A’s secret project', counts: { prompts: 2, messages: 3, files: 1 } });
    expect((await call(a, 'GET', `/api/v1/projects/${ids.project}/prompts/${ids.prompt}`)).json().title).toBe('A’s prompt');
  });

  it('never lists A’s projects to B, whatever the cursor', async () => {
    for (const url of ['/api/v1/projects', `/api/v1/projects?cursor=${encodeCursor(`projects:${b.id}`, ['00000000-0000-7000-8000-000000000000'])}`]) {
      const listed = (await call(b, 'GET', url)).json();
      expect(listed.data.map((p: { id: string }) => p.id)).toEqual([ids.ownProject]);
    }
  });
});
