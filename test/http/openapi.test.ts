import { validate } from '@readme/openapi-parser';
import { Ajv } from 'ajv';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { MAX_CHAT_MESSAGE_CHARS } from '../../src/modules/chat/schemas.js';
import { createProject, registerUser, startTestApp, startTestAppWithUpstream, type TestApp } from '../support/app.js';
import { multipart } from '../support/multipart.js';
import { asDocumented, registeredRoutes } from '../support/routes.js';
import { parseSse } from '../support/sse.js';

interface Operation {
  operationId?: string;
  security?: unknown[];
  parameters?: { in: string; name: string }[];
  requestBody?: { content: Record<string, { schema: Record<string, unknown> }> };
  responses: Record<string, { headers?: Record<string, unknown>; content?: Record<string, { schema: Record<string, unknown> }> }>;
}
interface Document {
  openapi: string;
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, { properties?: Record<string, unknown> }>; securitySchemes: Record<string, unknown> };
  security: unknown[];
}

let t: TestApp;
let doc: Document;
beforeAll(async () => {
  t = await startTestApp();
  const response = await t.app.inject({ method: 'GET', url: '/openapi.json' });
  expect(response.statusCode).toBe(200);
  doc = response.json();
});
afterAll(() => t.close());

const operations = () =>
  Object.entries(doc.paths).flatMap(([path, item]) =>
    Object.entries(item).map(([method, operation]) => ({ route: `${method.toUpperCase()} ${path}`, operation })),
  );
const operation = (method: string, path: string) => doc.paths[path]![method]!;
const PUBLIC = ['GET /health', 'GET /health/live', 'GET /metrics', 'GET /openapi.json', 'POST /api/v1/auth/register', 'POST /api/v1/auth/login'];
/** The GET that a HEAD is answered as (Fastify answers one beside each GET), any other route itself. */
const asGet = (route: string) => route.replace(/^HEAD /, 'GET ');

describe('OpenAPI document', () => {
  it('is a valid OpenAPI 3 document', async () => {
    expect(doc.openapi).toMatch(/^3\./);
    const result = await validate(structuredClone(doc) as never);
    expect(result.valid ? [] : result.errors).toEqual([]);
    expect(result.valid).toBe(true);
  });

  it('documents every registered route; only the UI under /docs is left out', () => {
    const documented = new Set(operations().map((entry) => entry.route));
    const registered = registeredRoutes(t.app);
    expect(registered.length).toBeGreaterThan(20);
    const undocumented = registered.filter((route) => !documented.has(asDocumented(route)));
    expect(undocumented.filter((route) => !route.startsWith('GET /docs'))).toEqual([]);
    expect(undocumented).toContain('GET /docs');
    // And nothing is documented that does not exist.
    const answered = new Set(registered.map(asDocumented));
    expect([...documented].filter((route) => !answered.has(asGet(route)))).toEqual([]);
  });

  it('documents bearer auth, and marks exactly the public routes as needing none', () => {
    expect(doc.components.securitySchemes.bearerAuth).toEqual({ type: 'http', scheme: 'bearer', bearerFormat: 'JWT' });
    expect(doc.security).toEqual([{ bearerAuth: [] }]);
    const open = operations().filter((entry) => Array.isArray(entry.operation.security) && entry.operation.security.length === 0);
    expect(open.map((entry) => asGet(entry.route)).sort()).toEqual([...PUBLIC, ...PUBLIC.filter((route) => route.startsWith('GET '))].sort());
  });

  it('gives every operation its problem+json errors: 401 and 429 with Retry-After when authenticated, 500 always', () => {
    for (const { route, operation: op } of operations()) {
      const errors = Object.entries(op.responses).filter(([status]) => Number(status) >= 400);
      expect(errors.length, route).toBeGreaterThan(0);
      const body = route.startsWith('HEAD ') ? undefined : { 'application/problem+json': { schema: { $ref: '#/components/schemas/Problem' } } };
      for (const [status, response] of errors) expect(response.content, `${route} ${status}`).toEqual(body);
      expect(op.responses['500'], route).toBeDefined();
      // Refused before any route is: malformed HTTP or no Host, headers over the limit, too slow to arrive.
      for (const status of ['400', '408', '431']) expect(op.responses[status], `${route} ${status}`).toBeDefined();
      for (const [status, response] of Object.entries(op.responses)) {
        expect((response as { headers?: object }).headers, `${route} ${status}`).toHaveProperty('X-Request-Id');
      }
      if (!PUBLIC.includes(asGet(route))) {
        expect(op.responses['401'], route).toBeDefined();
        expect(op.responses['429']?.headers, route).toHaveProperty('Retry-After');
        expect(op.responses['401']?.headers, route).toHaveProperty('WWW-Authenticate');
      }
    }
    expect(doc.components.schemas.Problem!.properties).toHaveProperty('code');
    expect(doc.components.schemas.Problem!.properties).toHaveProperty('requestId');
  });

  it('declares every tag its operations use, each with a description', () => {
    const declared = (doc as unknown as { tags: { name: string; description?: string }[] }).tags;
    const used = new Set(operations().flatMap((entry) => (entry.operation as { tags?: string[] }).tags ?? []));
    expect([...used].sort()).toEqual(declared.map((tag) => tag.name).sort());
    for (const tag of declared) expect(tag.description, tag.name).toBeTruthy();
  });

  it('names every operation, once, as a generated client can name a function', () => {
    const ids = operations().map((entry) => entry.operation.operationId);
    for (const id of ids) expect(id).toMatch(/^[a-z][A-Za-z]*$/);
    expect(new Set(ids).size).toBe(ids.length);
    expect(operation('get', '/api/v1/projects/{projectId}').operationId).toBe('getProject');
  });

  it('documents the HEAD of every GET as its GET without bodies, and answers it so', async () => {
    const gets = operations().filter((entry) => entry.route.startsWith('GET '));
    for (const { route, operation: get } of gets) {
      const [, path] = route.split(' ') as [string, string];
      const head = operation('head', path);
      expect(head.operationId, route).toBe(`${get.operationId}Head`);
      // A HEAD takes no Range: the download's HEAD has no 206, nor 416.
      const ranged = path.endsWith('/content') ? ['206', '416'] : [];
      expect(Object.keys(head.responses), route).toEqual(Object.keys(get.responses).filter((status) => !ranged.includes(status)));
      for (const [status, response] of Object.entries(head.responses)) {
        expect(response.content, `HEAD ${path} ${status}`).toBeUndefined();
        expect(response.headers, `HEAD ${path} ${status}`).toEqual(get.responses[status]!.headers);
      }
    }
    const user = await registerUser(t.app);
    await createProject(t.app, user);
    const [get, head] = await Promise.all(
      (['GET', 'HEAD'] as const).map((method) => t.app.inject({ method, url: '/api/v1/projects', headers: user.auth })),
    );
    expect([get!.statusCode, head!.statusCode]).toEqual([200, 200]);
    expect(head!.body).toBe('');
    expect(head!.headers['content-type']).toBe(get!.headers['content-type']);
  });

  it('names the route-specific problems, and the limits of login and register', () => {
    const chat = operation('post', '/api/v1/projects/{projectId}/chat');
    expect(Object.keys(chat.responses)).toEqual(expect.arrayContaining(['400', '404', '409', '422', '502', '503', '504']));
    expect(String((chat.responses['400'] as { description?: string }).description)).toContain('CONTEXT_TOO_LONG');
    expect(operation('post', '/api/v1/auth/register').responses['409']).toBeDefined();
    expect(operation('post', '/api/v1/auth/login').responses['429']).toBeDefined();
    expect(operation('get', '/health/live').responses['429']).toBeUndefined();
  });

  it("documents the headers of a download's answers, each as the route sends them", async () => {
    const user = await registerUser(t.app);
    const project = await createProject(t.app, user);
    const form = multipart({ filename: 'notes.txt', type: 'text/plain', content: 'ten bytes.' });
    const upload = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/files`, headers: { ...user.auth, ...form.headers }, payload: form.payload });
    expect(upload.statusCode, upload.body).toBe(201);
    const url = `${upload.headers.location}/content`;
    const etag = (await t.app.inject({ method: 'GET', url, headers: user.auth })).headers.etag as string;
    const answers: [string, Record<string, string>][] = [
      ['200', {}],
      ['206', { range: 'bytes=0-3' }],
      ['304', { 'if-none-match': etag }],
      ['416', { range: 'bytes=50-60' }],
    ];
    // What every response carries, or what says what a body is (the media type the document gives per response).
    const general = new Set(['content-type', 'date', 'connection', 'keep-alive', 'x-request-id', 'vary', 'cache-control', 'x-content-type-options', 'strict-transport-security', 'x-frame-options', 'content-security-policy', 'referrer-policy', 'cross-origin-resource-policy']);
    const download = operation('get', '/api/v1/projects/{projectId}/files/{fileId}/content');
    for (const [status, headers] of answers) {
      const response = await t.app.inject({ method: 'GET', url, headers: { ...user.auth, ...headers } });
      expect(String(response.statusCode)).toBe(status);
      const documented = Object.keys(download.responses[status]!.headers!).map((name) => name.toLowerCase());
      const own = Object.keys(response.headers).filter((name) => !general.has(name) && !(status !== '200' && status !== '206' && name === 'content-length'));
      expect(own.filter((name) => !documented.includes(name)), status).toEqual([]);
    }
  });

  it('documents every answer a route gives: the file routes without a JSON body, and 413/415 for DELETE with a body', () => {
    expect(operation('delete', '/api/v1/projects/{projectId}/files/{fileId}').responses['204']).toBeDefined();
    const download = operation('get', '/api/v1/projects/{projectId}/files/{fileId}/content');
    for (const status of ['200', '206']) expect(download.responses[status]!.content).toEqual({ '*/*': { schema: { type: 'string', format: 'binary' } } });
    expect(Object.keys(download.responses)).toEqual(expect.arrayContaining(['304', '412', '416']));
    // A bodiless DELETE too: Fastify parses what it is sent anyway (test/http/errors.test.ts).
    for (const [method, path] of [['delete', '/api/v1/auth/me'], ['delete', '/api/v1/projects/{projectId}'], ['delete', '/api/v1/projects/{projectId}/files/{fileId}']] as const) {
      expect(Object.keys(operation(method, path).responses), path).toEqual(expect.arrayContaining(['204', '413', '415']));
    }
    expect(operation('delete', '/api/v1/projects/{projectId}').responses['507']).toBeUndefined();
  });

  it('documents the upload’s form, which the route reads itself: one part, `file`, its bytes', () => {
    const upload = operation('post', '/api/v1/projects/{projectId}/files');
    expect(Object.keys(upload.requestBody?.content ?? {})).toEqual(['multipart/form-data']);
    expect(upload.requestBody!.content['multipart/form-data']!.schema).toMatchObject({
      type: 'object',
      properties: { file: { type: 'string', format: 'binary' } },
      required: ['file'],
      additionalProperties: false,
    });
  });

  it('says what the validation says beyond the schemas: a PATCH sets a field at least, a limit is 1 to 100', () => {
    for (const path of ['/api/v1/projects/{projectId}', '/api/v1/projects/{projectId}/prompts/{promptId}']) {
      const body = operation('patch', path).requestBody as { content: Record<string, { schema: { minProperties?: number } }> };
      expect(body.content['application/json']!.schema.minProperties, path).toBe(1);
    }
    const parameters = operation('get', '/api/v1/projects').parameters as { name: string; description?: string }[];
    expect(parameters.find((parameter) => parameter.name === 'limit')?.description).toMatch(/from 1 to 100 \(20 without it\)/);
  });

  it('takes request and response schemas from the Zod schemas that validate', () => {
    const create = operation('post', '/api/v1/projects');
    expect(create.requestBody!.content['application/json']!.schema).toMatchObject({
      properties: { name: { type: 'string', maxLength: 200 } },
      required: ['name'],
      additionalProperties: false,
    });
    expect(create.responses['201']!.content!['application/json']!.schema).toEqual({ $ref: '#/components/schemas/Project' });
    const list = operation('get', '/api/v1/projects');
    expect(list.parameters!.map((parameter) => `${parameter.in}.${parameter.name}`)).toEqual(['query.limit', 'query.cursor']);
    expect(operation('delete', '/api/v1/projects/{projectId}').responses['204']).toBeDefined();
  });

  it('writes every nullable schema so that a validator of OpenAPI 3.0 takes its null: a reference to a schema too', () => {
    const untyped: string[] = [];
    const visit = (value: unknown, path: string): void => {
      if (typeof value !== 'object' || value === null) return;
      if ((value as { nullable?: boolean }).nullable && (value as { type?: unknown }).type === undefined) untyped.push(path);
      for (const [key, child] of Object.entries(value)) visit(child, `${path}/${key}`);
    };
    visit(doc, '');
    expect(untyped).toEqual([]);
    // The answers as a client's validator reads them: OpenAPI 3.0's `nullable`, which ajv knows.
    const ajv = new Ajv({ strict: false });
    for (const [name, schema] of Object.entries(doc.components.schemas)) ajv.addSchema(schema, `#/components/schemas/${name}`);
    const message = ajv.getSchema('#/components/schemas/Message')!;
    const userMessage = { id: uuidv7(), projectId: uuidv7(), role: 'user', content: 'hi', status: 'complete', model: null, usage: null, createdAt: new Date().toISOString() };
    expect(message(userMessage), JSON.stringify(message.errors)).toBe(true);
    expect(message({ ...userMessage, usage: { promptTokens: 1, completionTokens: 2, totalTokens: 3 } })).toBe(true);
    expect(message({ ...userMessage, usage: 'none' })).toBe(false);
    expect(message({ ...userMessage, usage: {} })).toBe(false);
    // A nullable enum: a project's provider, null for the server's default.
    const project = ajv.getSchema('#/components/schemas/Project')!;
    const at = new Date().toISOString();
    const stored = { id: uuidv7(), name: 'Bot', description: null, provider: null, model: null, createdAt: at, updatedAt: at, counts: { prompts: 0, messages: 0, files: 0 } };
    expect(project(stored), JSON.stringify(project.errors)).toBe(true);
    expect(project({ ...stored, provider: 'openrouter' })).toBe(true);
    expect(project({ ...stored, provider: 'nobody' })).toBe(false);
  });

  // Their minLength alone let a validating client send a name of spaces, which the service refuses.
  it('says of every name the service trims that it needs a character that is not white space', async () => {
    const named: Record<string, unknown> = {};
    for (const { route, operation: { requestBody } } of operations()) {
      const properties = (requestBody?.content['application/json']?.schema.properties ?? {}) as Record<string, { minLength?: number; pattern?: string }>;
      for (const [field, schema] of Object.entries(properties)) if (schema.minLength === 1) named[`${route} ${field}`] = schema.pattern;
    }
    expect(Object.keys(named).sort()).toEqual(
      ['PATCH /api/v1/auth/me name', 'POST /api/v1/auth/register name', 'POST /api/v1/projects name', 'POST /api/v1/projects model', 'PATCH /api/v1/projects/{projectId} name',
        'PATCH /api/v1/projects/{projectId} model', 'POST /api/v1/projects/{projectId}/prompts title', 'PATCH /api/v1/projects/{projectId}/prompts/{promptId} title'].sort(),
    );
    expect(new Set(Object.values(named))).toEqual(new Set(['\\S']));
    const refused = await t.app.inject({ method: 'POST', url: '/api/v1/auth/register', payload: { email: `blank-${uuidv7()}@example.com`, password: 'password-1', name: '   ' } });
    expect(refused.statusCode).toBe(400);
    // And a password's rule, in bytes, which no keyword says.
    const register = operation('post', '/api/v1/auth/register').requestBody!.content['application/json']!.schema.properties as Record<string, { description?: string }>;
    expect(register.password!.description).toBe('8 to 72 bytes in UTF-8, once composed (NFC); no NUL');
  });

  it("documents the request headers a download reads, a HEAD's without a range", () => {
    const headers = (method: string) =>
      operation(method, '/api/v1/projects/{projectId}/files/{fileId}/content').parameters!.filter((parameter) => parameter.in === 'header').map((parameter) => parameter.name);
    expect(headers('get')).toEqual(['range', 'if-range', 'if-none-match', 'if-match']);
    expect(headers('head')).toEqual(['if-none-match', 'if-match']);
  });

  it('documents the chat reply as JSON and as a server-sent event stream', () => {
    const chat = operation('post', '/api/v1/projects/{projectId}/chat');
    expect(chat.requestBody!.content['application/json']!.schema).toMatchObject({
      properties: { message: { maxLength: MAX_CHAT_MESSAGE_CHARS } },
    });
    const content = chat.responses['200']!.content!;
    expect(content['application/json']!.schema).toEqual({ $ref: '#/components/schemas/ChatResult' });
    expect(content['text/event-stream']!.schema).toMatchObject({ type: 'string', description: expect.stringContaining('delta') });
    expect(chat.parameters).toContainEqual(expect.objectContaining({ in: 'header', name: 'idempotency-key' }));
  });

  it('names the data of each event of a stream, which the events a stream sends match', async () => {
    const stream = operation('post', '/api/v1/projects/{projectId}/chat').responses['200']!.content!['text/event-stream']!.schema;
    const events = stream['x-events'] as Record<string, { $ref: string }>;
    expect(Object.keys(events).sort()).toEqual(['delta', 'done', 'error', 'user_message']);
    const ajv = new Ajv({ strict: false });
    for (const [name, schema] of Object.entries(doc.components.schemas)) ajv.addSchema(schema, `#/components/schemas/${name}`);
    const withUpstream = await startTestAppWithUpstream({ AI_MAX_RETRIES: '0' });
    onTestFinished(() => withUpstream.close());
    const user = await registerUser(withUpstream.app);
    const project = await createProject(withUpstream.app, user);
    withUpstream.fake.enqueue({ content: 'one two' }, { content: 'broken here', fault: 'reset', afterChunks: 1 });
    const sent: { event: string; data: unknown }[] = [];
    for (let turn = 0; turn < 2; turn++) {
      const response = await withUpstream.app.inject({
        method: 'POST',
        url: `/api/v1/projects/${project.id}/chat`,
        headers: user.auth,
        payload: { message: `turn ${turn}`, stream: true },
      });
      sent.push(...parseSse(response.body).events);
    }
    expect(sent.map((event) => event.event)).toEqual(['user_message', 'delta', 'delta', 'done', 'user_message', 'delta', 'error']);
    for (const { event, data } of sent) {
      const validate = ajv.getSchema(events[event]!.$ref)!;
      expect(validate(data), `${event}: ${JSON.stringify(validate.errors)}`).toBe(true);
    }
    // And they are no wider than the events: a delta's data is not a done's.
    expect(ajv.getSchema(events.done!.$ref)!({ content: 'x' })).toBe(false);
  });
});

describe('Swagger UI', () => {
  it('serves the UI and its assets at /docs without a token', async () => {
    const page = await t.app.inject({ method: 'GET', url: '/docs' });
    expect(page.statusCode).toBe(200);
    expect(page.headers['content-type']).toContain('text/html');
    const initializer = await t.app.inject({ method: 'GET', url: '/docs/static/swagger-initializer.js' });
    expect(initializer.statusCode).toBe(200);
    const bundle = await t.app.inject({ method: 'GET', url: '/docs/static/swagger-ui-bundle.js' });
    expect(bundle.statusCode).toBe(200);
    const copy = await t.app.inject({ method: 'GET', url: '/docs/json' });
    expect(copy.json()).toEqual(doc);
  });

  it('sends a path under /docs with a slash at its end to the path without it: its index page is not a loop', async () => {
    const get = (url: string) => t.app.inject({ method: 'GET', url });
    const slashed = await get('/docs/static/index.html/?a=1');
    expect([slashed.statusCode, slashed.headers.location]).toEqual([308, '/docs/static/index.html?a=1']);
    const index = await get('/docs/static/index.html');
    expect([index.statusCode, index.headers.location]).toEqual([302, '/docs/']);
    expect((await get('/docs/')).statusCode).toBe(200);
    expect((await get('/docs/json/')).headers.location).toBe('/docs/json');
  });
});
