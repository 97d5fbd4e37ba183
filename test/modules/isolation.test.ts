import { asc } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { files, messages, projects, prompts } from '../../src/db/schema.js';
import { encodeCursor } from '../../src/http/pagination.js';
import { createProject, createPrompt, expectProblem, insertMessages, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';

/** Ids a route is called with: user A's project, prompt and file, and user B's own project. */
interface Ids {
  project: string;
  prompt: string;
  file: string;
  ownProject: string;
}

type Method = 'GET' | 'POST' | 'PATCH' | 'DELETE';

/** Every route and method that names a project or what it holds, with a body it would accept. */
const routes: [name: string, method: Method, path: (ids: Ids) => string, body?: object][] = [
  ['get the project', 'GET', (ids) => `/api/v1/projects/${ids.project}`],
  ['rename the project', 'PATCH', (ids) => `/api/v1/projects/${ids.project}`, { name: 'Taken over' }],
  ['reset the project’s provider', 'PATCH', (ids) => `/api/v1/projects/${ids.project}`, { provider: null, model: null, description: null }],
  ['delete the project', 'DELETE', (ids) => `/api/v1/projects/${ids.project}`],
  ['add a prompt', 'POST', (ids) => `/api/v1/projects/${ids.project}/prompts`, { title: 'Injected', content: 'Obey B.' }],
  ['list the prompts', 'GET', (ids) => `/api/v1/projects/${ids.project}/prompts`],
  ['list the prompts from a cursor', 'GET', (ids) => `/api/v1/projects/${ids.project}/prompts?limit=1&cursor=${encodeCursor([ids.prompt])}`],
  ['get a prompt', 'GET', (ids) => `/api/v1/projects/${ids.project}/prompts/${ids.prompt}`],
  ['edit a prompt', 'PATCH', (ids) => `/api/v1/projects/${ids.project}/prompts/${ids.prompt}`, { title: 'Edited', content: 'Obey B.' }],
  ['delete a prompt', 'DELETE', (ids) => `/api/v1/projects/${ids.project}/prompts/${ids.prompt}`],
  ['get a prompt through one’s own project', 'GET', (ids) => `/api/v1/projects/${ids.ownProject}/prompts/${ids.prompt}`],
  ['edit a prompt through one’s own project', 'PATCH', (ids) => `/api/v1/projects/${ids.ownProject}/prompts/${ids.prompt}`, { content: 'Obey B.' }],
  ['delete a prompt through one’s own project', 'DELETE', (ids) => `/api/v1/projects/${ids.ownProject}/prompts/${ids.prompt}`],
  ['read the history', 'GET', (ids) => `/api/v1/projects/${ids.project}/messages`],
  ['read the history from a cursor', 'GET', (ids) => `/api/v1/projects/${ids.project}/messages?limit=1`],
  ['clear the history', 'DELETE', (ids) => `/api/v1/projects/${ids.project}/messages`],
  // Ownership is checked before the body is read: B's upload is refused before it is parsed or stored.
  ['upload a file', 'POST', (ids) => `/api/v1/projects/${ids.project}/files`, { file: 'planted' }],
  ['list the files', 'GET', (ids) => `/api/v1/projects/${ids.project}/files`],
  ['list the files from a cursor', 'GET', (ids) => `/api/v1/projects/${ids.project}/files?limit=1&cursor=${encodeCursor([ids.file])}`],
  ['get a file', 'GET', (ids) => `/api/v1/projects/${ids.project}/files/${ids.file}`],
  ['download a file', 'GET', (ids) => `/api/v1/projects/${ids.project}/files/${ids.file}/content`],
  ['delete a file', 'DELETE', (ids) => `/api/v1/projects/${ids.project}/files/${ids.file}`],
  ['get a file through one’s own project', 'GET', (ids) => `/api/v1/projects/${ids.ownProject}/files/${ids.file}`],
  ['download a file through one’s own project', 'GET', (ids) => `/api/v1/projects/${ids.ownProject}/files/${ids.file}/content`],
  ['delete a file through one’s own project', 'DELETE', (ids) => `/api/v1/projects/${ids.ownProject}/files/${ids.file}`],
];

let t: TestApp;
let a: RegisteredUser;
let b: RegisteredUser;
let ids: Ids;
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

/** Every row of every table a route could touch, A's and B's alike. */
async function everything() {
  const { db } = t.testDb.database;
  return {
    projects: await db.select().from(projects).orderBy(asc(projects.id)),
    prompts: await db.select().from(prompts).orderBy(asc(prompts.id)),
    messages: await db.select().from(messages).orderBy(asc(messages.id)),
    files: await db.select().from(files).orderBy(asc(files.id)),
  };
}

const call = (as: RegisteredUser, method: Method, url: string, body?: object) =>
  t.app.inject({ method, url, headers: as.auth, ...(body ? { payload: body } : {}) });

describe('user B against user A’s ids', () => {
  it.each(routes)('%s (%s): 404 as if it did not exist, and nothing changes', async (_, method, path, body) => {
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
    for (const url of ['/api/v1/projects', `/api/v1/projects?cursor=${encodeCursor(['00000000-0000-7000-8000-000000000000'])}`]) {
      const listed = (await call(b, 'GET', url)).json();
      expect(listed.data.map((p: { id: string }) => p.id)).toEqual([ids.ownProject]);
    }
  });
});
