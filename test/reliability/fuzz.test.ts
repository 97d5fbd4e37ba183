import { and, eq } from 'drizzle-orm';
import fc from 'fast-check';
import { createSigner } from 'fast-jwt';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { BODY_LIMIT_BYTES } from '../../src/http/body-limits.js';
import { files, messages, projects, prompts } from '../../src/db/schema.js';
import { isUuid } from '../../src/http/ids.js';
import { encodeCursor } from '../../src/http/pagination.js';
import {
  createProject,
  createPrompt,
  insertMessages,
  registerUser,
  type RegisteredUser,
  TEST_SECRET,
  type TestApp,
  testConfig,
} from '../support/app.js';
import { createTestDatabase } from '../support/database.js';
import { FakeUpstream } from '../support/fake-upstream.js';
import { logCollector } from '../support/logs.js';
import { BOUNDARY, type FormPart, multipart } from '../support/multipart.js';
import {
  BYTES_MARKER,
  type Endpoint,
  endpointsOf,
  type Hints,
  hostileString,
  INVALID_UTF8,
  nestedJson,
  type OpenApiDocument,
  outOfBoundsFor,
  problemViolations,
  resolve,
  spliceBytes,
  valueOf,
  withRawMembers,
  wrongTypeFor,
} from '../support/openapi-arbitraries.js';
import { storedStateReader } from '../support/stored-state.js';

/*
 * Property-based fuzzing of every operation of the OpenAPI document the service serves, with requests
 * generated from that document: valid ones (and valid ones carrying hostile text), and mutated ones that
 * the contract says must be refused. Each run sends one batch, either of generated requests (which may
 * succeed and change what is stored) or of mutated ones only. For every answer: never a 5xx, every 4xx
 * is the contract's problem+json, every status is one the document lists. For a batch in which nothing
 * succeeded (a mutated batch always): nothing stored changed, in any table or under DATA_DIR, and no
 * provider was called. After all of it: Object.prototype and friends are as they were.
 */

const BATCHES = 420;
const BATCH_SIZE = 25;
const MIN_REQUESTS = 10_000;
/** Requests of a batch in flight at once. */
const PARALLEL = 4;
/** Small, so that an upload over the limit is cheap to send. */
const FILE_MAX_BYTES = 4096;

let t: Omit<TestApp, 'close'> & { fake: FakeUpstream };
let doc: OpenApiDocument;
let endpoints: Endpoint[];
let user: RegisteredUser;
/** A user whose credentials the generated logins sometimes send (never the fuzzed user's: no generated request may delete it). */
let loginUser: RegisteredUser;
let foreign: { projectId: string; promptId: string; fileId: string };
let badAuthorizations: string[];
let readState: () => Promise<Record<string, string>>;
const errorLog = logCollector();

beforeAll(async () => {
  // Both providers at the fake upstream, so that a project may name either: OpenRouter as the default
  // (AI_BASE_URL), OpenAI with its Files API (OPENAI_BASE_URL). Errors are logged, to explain any 5xx.
  const fake = await FakeUpstream.start();
  const testDb = await createTestDatabase();
  const config = testConfig({
    AI_PROVIDER: 'openrouter',
    AI_BASE_URL: fake.url,
    OPENAI_API_KEY: 'sk-fuzz',
    OPENAI_BASE_URL: fake.url,
    FILE_MAX_BYTES: String(FILE_MAX_BYTES),
    LOG_LEVEL: 'error',
  });
  const app = await buildApp(config, { database: testDb.database, logStream: errorLog.stream });
  await app.ready();
  t = { app, config, testDb, fake };
  const response = await t.app.inject({ method: 'GET', url: '/openapi.json' });
  expect(response.statusCode).toBe(200);
  doc = response.json();
  endpoints = endpointsOf(doc);
  user = await registerUser(t.app);
  loginUser = await registerUser(t.app, { password: 'fuzz login password' });

  const other = await registerUser(t.app);
  const otherProject = await createProject(t.app, other);
  foreign = {
    projectId: otherProject.id,
    promptId: (await createPrompt(t.app, other, otherProject.id)).id,
    fileId: await uploadFile(other, otherProject.id),
  };
  await insertMessages(t.testDb.database.db, otherProject.id, 2);

  const gone = await registerUser(t.app);
  const deleted = await t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: gone.auth, payload: { password: gone.password } });
  expect(deleted.statusCode).toBe(204);
  badAuthorizations = badTokens(gone.token);

  readState = await storedStateReader(t.testDb.database.db, t.config.DATA_DIR);
});

afterAll(async () => {
  await t?.app.close();
  await t?.testDb.drop();
  await t?.fake.close();
});

// ---- ids: generated as references, resolved against what exists when the request is sent ----

/** A path parameter: an id of the caller's (`own`, or `elsewhere`: of another of its projects), another user's, none, or a raw segment. */
type IdRef = { ref: 'own' | 'elsewhere' | 'foreign' | 'missing'; pick: number } | { ref: 'raw'; segment: string };

interface Pool {
  projects: string[];
  /** Child ids by kind (`promptId`, `fileId`), by project. */
  children: Record<string, Map<string, string[]>>;
}

async function loadPool(): Promise<Pool> {
  const db = t.testDb.database.db;
  const owned = (table: typeof prompts | typeof files) =>
    db.select({ id: table.id, projectId: table.projectId }).from(table).innerJoin(projects, and(eq(projects.id, table.projectId), eq(projects.userId, user.id))).orderBy(table.id);
  const byProject = (rows: { id: string; projectId: string }[]) => {
    const map = new Map<string, string[]>();
    for (const row of rows) map.set(row.projectId, [...(map.get(row.projectId) ?? []), row.id]);
    return map;
  };
  const projectRows = await db.select({ id: projects.id }).from(projects).where(eq(projects.userId, user.id)).orderBy(projects.id);
  return {
    projects: projectRows.map((row) => row.id),
    children: { promptId: byProject(await owned(prompts)), fileId: byProject(await owned(files)) },
  };
}

const at = <T>(list: readonly T[], pick: number): T | undefined => (list.length ? list[pick % list.length] : undefined);

function resolveParams(plan: Plan, pool: Pool): Record<string, string> {
  const values: Record<string, string> = {};
  const project = plan.params.projectId;
  for (const [name, ref] of Object.entries(plan.params)) {
    if (ref.ref === 'raw') {
      values[name] = ref.segment;
      continue;
    }
    if (ref.ref === 'missing') {
      values[name] = uuidv7();
      continue;
    }
    const foreignId = (foreign as Record<string, string>)[name];
    if (ref.ref === 'foreign') {
      values[name] = foreignId ?? uuidv7();
      continue;
    }
    if (name === 'projectId') {
      values[name] = at(pool.projects, ref.pick) ?? uuidv7();
      continue;
    }
    const children = pool.children[name] ?? new Map<string, string[]>();
    const projectId = values.projectId ?? (project?.ref === 'raw' ? project.segment : '');
    const candidates = ref.ref === 'own' ? (children.get(projectId) ?? []) : [...children].filter(([id]) => id !== projectId).flatMap(([, ids]) => ids);
    values[name] = at(candidates, ref.pick) ?? uuidv7();
  }
  return values;
}

// ---- request plans ----

type Body = { json: unknown } | { raw: () => Buffer | string; contentType?: string; about: string };

interface Plan {
  /** `valid`, `hostile-content`, or the mutation's name. */
  kind: string;
  /** A mutated request: the contract says it must be refused. */
  mustReject: boolean;
  endpoint: Endpoint;
  method: string;
  params: Record<string, IdRef>;
  /** The raw query string, without `?`. */
  query: string;
  headers: Record<string, string>;
  /** Whose bearer token, or the Authorization header as given. */
  auth: 'user' | 'none' | { header: string };
  body?: Body;
}

const clip = (text: string, max = 160) => (text.length > max ? `${text.slice(0, max)}… (${text.length} chars)` : text);

function describe(plan: Plan): string {
  const path = plan.endpoint.path.replace(/\{(\w+)\}/g, (_, name: string) => {
    const ref = plan.params[name]!;
    return ref.ref === 'raw' ? clip(ref.segment, 60) : `{${ref.ref}}`;
  });
  const auth = plan.auth === 'user' || plan.auth === 'none' ? plan.auth : `Authorization: ${clip(plan.auth.header, 40)}`;
  const body = plan.body === undefined ? '' : 'json' in plan.body ? ` body ${clip(JSON.stringify(plan.body.json) ?? 'undefined')}` : ` body ${plan.body.about}`;
  const headers = Object.keys(plan.headers).length ? ` headers ${clip(JSON.stringify(plan.headers), 80)}` : '';
  return `[${plan.kind}] ${plan.method} ${path}${plan.query ? `?${clip(plan.query, 80)}` : ''} (${auth})${headers}${body}`;
}

/** Plans print as one line in fast-check's counterexample. */
function planOf(plan: Plan): Plan {
  return Object.assign(plan, { [fc.toStringMethod]: () => describe(plan) });
}

const isUpload = (e: Endpoint) => e.method === 'POST' && !e.body && /multipart\/form-data/.test(e.operation.description ?? '');
const takesBody = (e: Endpoint) => Boolean(e.body) || isUpload(e);
const bodyObject = (plan: Plan): Record<string, unknown> =>
  plan.body && 'json' in plan.body && typeof plan.body.json === 'object' && plan.body.json !== null ? (plan.body.json as Record<string, unknown>) : {};

/** Percent-encoded UTF-8; a lone surrogate (which has none) as U+FFFD. Raw bytes that are not UTF-8 are sent as constants. */
const encode = (value: string) => encodeURIComponent(value.replace(/\p{Surrogate}/gu, '\ufffd'));
const encodeQuery = (pairs: [string, unknown][]) => pairs.map(([key, value]) => `${encode(key)}=${encode(String(value))}`).join('&');

const ownRef: fc.Arbitrary<IdRef> = fc.oneof(
  { weight: 12, arbitrary: fc.nat(50).map((pick): IdRef => ({ ref: 'own', pick })) },
  { weight: 1, arbitrary: fc.constantFrom<IdRef>({ ref: 'missing', pick: 0 }, { ref: 'foreign', pick: 0 }, { ref: 'elsewhere', pick: 0 }) },
);

/** Valid values of what the document cannot tell: a well-formed email, a long enough password, cursors, keys. */
const hints = (): Hints => ({
  email: fc.oneof(
    fc.stringMatching(/^[a-z0-9]{1,20}$/).map((local) => `fuzz-${local}@example.com`),
    fc.constantFrom(user.email, loginUser.email),
    fc.emailAddress(),
    fc.string(),
  ),
  password: fc.oneof(fc.string({ unit: 'grapheme', minLength: 8, maxLength: 30 }), fc.string({ maxLength: 12 }), fc.constant(loginUser.password)),
  cursor: fc.oneof(
    fc.uuid({ version: 7 }).map((id) => encodeCursor(`projects:${user.id}`, [id])),
    fc.tuple(fc.bigInt({ min: 0n, max: 10n ** 16n - 1n }), fc.uuid({ version: 7 })).map(([micros, id]) => encodeCursor('messages', [String(micros), id])),
    fc.string({ maxLength: 30 }),
  ),
  'idempotency-key': fc.oneof(fc.constantFrom('fuzz-key-1', 'fuzz-key-2', 'fuzz-key-3'), fc.stringMatching(/^[\w.:-]{1,60}$/)),
});

/** One multipart/form-data upload of `parts`, as a plan's body. */
function formBody(about: string, ...parts: FormPart[]): Body {
  const { payload, headers } = multipart(...parts);
  return { raw: () => payload, contentType: headers['content-type'], about };
}

const uploadFilename = fc.oneof(fc.constantFrom('notes.txt', 'photo.png', 'data.json', 'report.pdf'), fc.string({ unit: 'grapheme', minLength: 1, maxLength: 30 }).filter((name) => !/["\\\r\n]/.test(name)));
const uploadType = fc.constantFrom('text/plain', 'text/markdown', 'application/json', 'application/octet-stream', 'image/png', 'application/pdf');
const uploadContent = fc.oneof(fc.string({ maxLength: 300 }), fc.uint8Array({ maxLength: FILE_MAX_BYTES }));

const validUpload: fc.Arbitrary<Body> = fc
  .tuple(uploadFilename, uploadType, uploadContent)
  .map(([filename, type, content]) => formBody(`multipart ${JSON.stringify(filename)} ${type}, ${content.length} bytes`, { filename, type, content }));

/** Requests as the document describes them (ids mostly the caller's own); they may well succeed. */
function validPlan(e: Endpoint, h: Hints): fc.Arbitrary<Plan> {
  const params = fc.record(Object.fromEntries(e.pathParams.map((p) => [p.name, ownRef])));
  const optional = <T>(arbitrary: fc.Arbitrary<T>, required = false) => (required ? arbitrary : fc.option(arbitrary, { nil: undefined }));
  const query = fc
    .tuple(...e.query.map((p) => optional(valueOf(doc, p.schema, h, p.name), p.required).map((value) => [p.name, value] as [string, unknown])))
    .map((pairs) => encodeQuery(pairs.filter(([, value]) => value !== undefined)));
  const headers = fc
    .tuple(...e.headers.map((p) => optional(valueOf(doc, p.schema, h, p.name), p.required).map((value) => [p.name, value] as [string, unknown])))
    .map((pairs) => Object.fromEntries(pairs.filter(([, value]) => value !== undefined).map(([name, value]) => [name, String(value)])));
  const body: fc.Arbitrary<Body | undefined> = e.body
    ? valueOf(doc, e.body, h).map((json) => ({ json }))
    : isUpload(e)
      ? validUpload
      : fc.constant(undefined);
  return fc.record({ params, query, headers, body }).map((parts) =>
    planOf({ kind: 'valid', mustReject: false, endpoint: e, method: e.method, auth: e.authenticated ? 'user' : 'none', ...parts }),
  );
}

/** Valid requests whose text is hostile: injection strings, NUL, lone surrogates, invalid UTF-8 bytes. They may succeed too, but for the bytes. */
function hostilePlan(e: Endpoint, valid: fc.Arbitrary<Plan>): fc.Arbitrary<Plan> | undefined {
  const stringKeys = Object.entries(e.body?.properties ?? {})
    .filter(([, schema]) => resolve(doc, schema).type === 'string' && !resolve(doc, schema).enum)
    .map(([key]) => key);
  const variants: fc.Arbitrary<Plan>[] = [];
  if (stringKeys.length) {
    variants.push(
      fc.tuple(valid, fc.subarray(stringKeys, { minLength: 1 }), fc.array(hostileString(), { minLength: stringKeys.length, maxLength: stringKeys.length })).map(([plan, keys, values]) => {
        const json = { ...bodyObject(plan), ...Object.fromEntries(keys.map((key, i) => [key, values[i]])) };
        return { ...plan, body: { json } };
      }),
      fc.tuple(valid, fc.constantFrom(...stringKeys), fc.constantFrom(...INVALID_UTF8)).map(([plan, key, bytes]) => {
        const text = JSON.stringify({ ...bodyObject(plan), [key]: `bad${BYTES_MARKER}bytes` });
        const about = `${clip(text.replace(BYTES_MARKER, `<${bytes.map((b) => b.toString(16)).join(' ')}>`))}`;
        // Refused: decoded, the bytes would be U+FFFD, another text than the one sent.
        return { ...plan, mustReject: true, body: { raw: () => spliceBytes(text, bytes), contentType: 'application/json', about } };
      }),
    );
  }
  if (e.headers.length) {
    const latin1 = hostileString().map((value) => value.replace(/[^\u0020-\u007e\u00a0-\u00ff]/g, '') || 'x');
    variants.push(fc.tuple(valid, fc.constantFrom(...e.headers.map((p) => p.name)), latin1).map(([plan, name, value]) => ({ ...plan, headers: { ...plan.headers, [name]: value } })));
  }
  if (isUpload(e)) {
    variants.push(
      fc.tuple(valid, hostileString(), hostileString(), uploadContent).map(([plan, filename, type, content]) => ({
        ...plan,
        body: formBody(`multipart ${JSON.stringify(filename)} ${JSON.stringify(type)}, ${content.length} bytes`, { filename, type, content }),
      })),
    );
  }
  if (!variants.length) return undefined;
  return fc.oneof(...variants).map((plan) => planOf({ ...plan, kind: 'hostile-content' }));
}

// ---- mutations: each yields requests the contract says must be refused ----

const POLLUTION = '{"polluted":"yes","isAdmin":true}';
const HTTP_METHODS = ['GET', 'POST', 'PUT', 'PATCH', 'DELETE'];
const DEPTHS = [1_000, 10_000, 100_000];

const decodedSegment = (segment: string) => {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
};

/** Path segments that are no id: random text, injection strings, 101 to 20,000 characters, bad percent-encoding. */
const garbageSegment: fc.Arbitrary<string> = fc
  .oneof(
    fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }).map(encode),
    hostileString().map(encode),
    fc.integer({ min: 101, max: 20_000 }).map((length) => 'a'.repeat(length)),
    fc.uuid().map((id) => id.replace(/-/g, '')),
    fc.uuid().map((id) => `{${id}}`),
    fc.uuid().map((id) => `${id.slice(0, -1)}g`),
    fc.uuid().map((id) => `${id}%00`),
    fc.constantFrom('%', '%zz', '%E0%A4%A', '%C0%AF', '%ED%A0%80', '%FF', '%00', '%2F', 'null', 'undefined', '0', '-1', '*', '%2e%2e%2f'),
  )
  .filter((segment) => {
    const decoded = decodedSegment(segment);
    return decoded !== '' && decoded !== '.' && decoded !== '..' && !isUuid(decoded);
  });

const validLimit = (value: string) => /^\d{1,3}$/.test(value) && Number(value) >= 1 && Number(value) <= 100;
const badLimit = fc
  .oneof(fc.constantFrom('0', '000', '101', '999', '1000', '-1', '1.5', '1e1', ' 5', '5 ', '0x10', '+5', '٣', '1,2', '', 'Infinity', 'NaN', 'null', '[]'), fc.string({ maxLength: 8 }))
  .filter((value) => !validLimit(value));

/** Whether `cursor` decodes to the sort key of some list, `[id]` or `[microseconds, id]` (then it is not garbage). */
function looksLikeCursor(cursor: string): boolean {
  try {
    const key = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as unknown[];
    const [first, second] = Array.isArray(key) ? key.map(String) : [];
    return (key.length === 1 && isUuid(first!)) || (key.length === 2 && /^-?\d{1,16}$/.test(first!) && isUuid(second!));
  } catch {
    return false;
  }
}
const badCursor = fc
  .oneof(
    fc.string({ maxLength: 40 }),
    hostileString(),
    fc.jsonValue({ maxDepth: 2 }).map((value) => Buffer.from(JSON.stringify(value) ?? 'null').toString('base64url')),
    fc.uuid().map((id) => Buffer.from(JSON.stringify([id, id, id])).toString('base64url')),
    fc.uuid().map((id) => Buffer.from(JSON.stringify(['1.5', id])).toString('base64url')),
    fc.uuid().map((id) => Buffer.from(JSON.stringify(['12345678901234567', id])).toString('base64url')),
    fc.integer({ min: 513, max: 5_000 }).map((length) => 'A'.repeat(length)),
  )
  .filter((cursor) => cursor.length > 512 || !looksLikeCursor(cursor));

interface Mutation {
  name: string;
  applies(e: Endpoint): boolean;
  apply(e: Endpoint, plan: Plan): fc.Arbitrary<Plan>;
}

const raw = (raw: () => Buffer | string, about: string, contentType = 'application/json'): Body => ({ raw, contentType, about });

/** A property of the body's schema, and the schema, for each property `pick` has an arbitrary for. */
function propertiesWith<T>(e: Endpoint, pick: (schema: NonNullable<Endpoint['body']>) => fc.Arbitrary<T> | undefined): [string, fc.Arbitrary<T>][] {
  return Object.entries(e.body?.properties ?? {}).flatMap(([key, schema]) => {
    const arbitrary = pick(schema);
    return arbitrary ? [[key, arbitrary] as [string, fc.Arbitrary<T>]] : [];
  });
}

/** A body with one property replaced by a value drawn for that property. */
function replacingProperty<T>(candidates: [string, fc.Arbitrary<T>][], plan: Plan): fc.Arbitrary<Plan> {
  return fc.oneof(...candidates.map(([key, arbitrary]) => arbitrary.map((value): Plan => ({ ...plan, body: { json: { ...bodyObject(plan), [key]: value } } }))));
}

const MUTATIONS: Mutation[] = [
  { name: 'no-auth', applies: (e) => e.authenticated, apply: (_, plan) => fc.constant({ ...plan, auth: 'none' as const }) },
  {
    name: 'bad-token',
    applies: (e) => e.authenticated,
    apply: (_, plan) => fc.constantFrom(...badAuthorizations).map((header) => ({ ...plan, auth: { header } })),
  },
  {
    name: 'wrong-type',
    applies: (e) => propertiesWith(e, (s) => wrongTypeFor(doc, s)).length > 0,
    apply: (e, plan) => replacingProperty(propertiesWith(e, (s) => wrongTypeFor(doc, s)), plan),
  },
  {
    name: 'out-of-bounds',
    applies: (e) => propertiesWith(e, (s) => outOfBoundsFor(doc, s)).length > 0,
    apply: (e, plan) => replacingProperty(propertiesWith(e, (s) => outOfBoundsFor(doc, s)), plan),
  },
  {
    name: 'not-in-enum',
    applies: (e) => propertiesWith(e, (s) => resolve(doc, s).enum && fc.string()).length > 0,
    apply: (e, plan) =>
      replacingProperty(
        propertiesWith(e, (s) => {
          const allowed = resolve(doc, s).enum;
          return allowed && fc.oneof(fc.string(), hostileString()).filter((value) => !allowed.includes(value));
        }),
        plan,
      ),
  },
  {
    name: 'missing-required',
    applies: (e) => (e.body?.required?.length ?? 0) > 0,
    apply: (e, plan) =>
      fc.constantFrom(...e.body!.required!).map((key) => {
        const { [key]: _dropped, ...rest } = bodyObject(plan);
        return { ...plan, body: { json: rest } };
      }),
  },
  {
    name: 'unknown-property',
    applies: (e) => e.body?.additionalProperties === false,
    apply: (e, plan) =>
      fc
        .tuple(
          fc
            .oneof(fc.constantFrom('prototype', 'isAdmin', 'userId', 'id', 'role', 'createdAt', '$where', 'toString', 'hasOwnProperty', '__defineGetter__'), fc.string({ minLength: 1, maxLength: 20 }))
            .filter((key) => !(key in (e.body?.properties ?? {})) && key !== '__proto__'),
          fc.jsonValue({ maxDepth: 2 }),
        )
        .map(([key, value]) => ({ ...plan, body: { json: { ...bodyObject(plan), [key]: value } } })),
  },
  {
    name: 'prototype-pollution',
    applies: (e) => Boolean(e.body),
    apply: (e, plan) =>
      fc
        .tuple(
          fc.constantFrom<[string, string]>(['__proto__', POLLUTION], ['constructor', `{"prototype":${POLLUTION}}`], ['__proto__', `{"__proto__":${POLLUTION}}`]),
          fc.constantFrom(undefined, ...Object.keys(e.body?.properties ?? {})),
        )
        .map(([[key, value], inside]) => {
          const object = bodyObject(plan);
          // At the top level, or as the value of one of the body's own properties.
          const text = inside === undefined ? withRawMembers(object, [[key, value]]) : withRawMembers({ ...object, [inside]: undefined }, [[inside, `{${JSON.stringify(key)}:${value}}`]]);
          return { ...plan, body: raw(() => text, clip(text)) };
        }),
  },
  {
    name: 'deep-nesting',
    applies: (e) => Boolean(e.body),
    apply: (e, plan) =>
      fc.tuple(fc.constantFrom(...DEPTHS), fc.constantFrom<'array' | 'object'>('array', 'object'), fc.constantFrom(undefined, ...Object.keys(e.body?.properties ?? {}))).map(([depth, kind, inside]) => {
        const build = () => {
          const nested = nestedJson(depth, kind);
          return inside === undefined ? nested : withRawMembers({ ...bodyObject(plan), [inside]: undefined }, [[inside, nested]]);
        };
        return { ...plan, body: raw(build, `${inside === undefined ? 'the body' : inside}: ${kind}s nested ${depth} deep`) };
      }),
  },
  {
    name: 'not-an-object',
    applies: (e) => Boolean(e.body),
    apply: (_, plan) => fc.oneof(fc.jsonValue({ maxDepth: 2 }).filter((value) => typeof value !== 'object' || value === null || Array.isArray(value)), fc.constant([bodyObject(plan)])).map((json) => ({ ...plan, body: { json } })),
  },
  {
    name: 'malformed-json',
    applies: (e) => Boolean(e.body),
    apply: (_, plan) => {
      const text = JSON.stringify(bodyObject(plan));
      return fc
        .oneof(
          fc.constantFrom(text.slice(0, -1), `${text.slice(0, -1)},}`, `${text}}`, `${text}garbage`, `${text}${text}`, text.replace(/"/g, "'"), `{a:1}`, 'NaN', '{"a":1,,}', '\ufeff{', '{"a":"\u0000"}', '{"a":"\n"}', '/* */{}'),
          fc.constantFrom(...INVALID_UTF8).map((bytes) => spliceBytes(`${text.slice(0, -1)}${BYTES_MARKER}}`, bytes)),
          fc.constantFrom(...INVALID_UTF8).map((bytes) => spliceBytes(`${BYTES_MARKER}${text}`, bytes)),
        )
        .map((payload) => ({ ...plan, body: raw(() => payload, `raw ${clip(JSON.stringify(payload.toString('latin1')))}`) }));
    },
  },
  {
    name: 'empty-body',
    applies: (e) => Boolean(e.body),
    apply: (_, plan) => fc.constantFrom<Body | undefined>(raw(() => '', 'empty, as application/json'), undefined).map((body) => ({ ...plan, body })),
  },
  {
    name: 'wrong-content-type',
    applies: takesBody,
    apply: (e, plan) => {
      const text = JSON.stringify(bodyObject(plan));
      const types = isUpload(e)
        ? ['application/json', 'text/plain', 'application/x-www-form-urlencoded', 'application/octet-stream']
        : ['text/plain', 'text/html', 'application/xml', 'application/x-www-form-urlencoded', 'application/octet-stream', 'image/png', `multipart/form-data; boundary=${BOUNDARY}`];
      return fc.constantFrom(...types).map((contentType) => ({ ...plan, body: raw(() => text, `${clip(text)} as ${contentType}`, contentType) }));
    },
  },
  {
    name: 'oversize',
    applies: takesBody,
    apply: (e, plan) => {
      if (isUpload(e)) {
        return fc.integer({ min: 1, max: 2_000 }).map((over) => ({
          ...plan,
          body: formBody(`a file of FILE_MAX_BYTES + ${over} bytes`, { filename: 'big.bin', type: 'application/octet-stream', content: new Uint8Array(FILE_MAX_BYTES + over) }),
        }));
      }
      const key = Object.keys(e.body?.properties ?? {})[0] ?? 'x';
      return fc.integer({ min: 1, max: 100_000 }).map((over) => ({
        ...plan,
        body: raw(() => JSON.stringify({ ...bodyObject(plan), [key]: 'x'.repeat(BODY_LIMIT_BYTES + over) }), `${key}: ${BODY_LIMIT_BYTES + over} characters`),
      }));
    },
  },
  {
    name: 'bad-path-id',
    applies: (e) => e.pathParams.length > 0,
    apply: (e, plan) =>
      fc.tuple(fc.constantFrom(...e.pathParams.map((p) => p.name)), fc.constantFrom('garbage', 'missing', 'foreign', 'elsewhere'), garbageSegment).map(([name, how, segment]) => {
        const ref: IdRef = how === 'garbage' || (how === 'elsewhere' && name === 'projectId') ? { ref: 'raw', segment } : { ref: how as 'missing' | 'foreign' | 'elsewhere', pick: 0 };
        return { ...plan, params: { ...plan.params, [name]: ref } };
      }),
  },
  {
    name: 'bad-query',
    applies: (e) => e.query.length > 0,
    apply: (e, plan) => {
      const names = new Set(e.query.map((p) => p.name));
      return fc
        .oneof(
          names.has('limit') ? badLimit.map((limit) => encodeQuery([['limit', limit]])) : fc.constant('unknown=1'),
          names.has('cursor') ? badCursor.map((cursor) => encodeQuery([['cursor', cursor]])) : fc.constant('unknown=1'),
          fc.constantFrom('limit=1&limit=2', 'cursor=a&cursor=b', 'limit=%FF', 'cursor=%ED%A0%80', 'limit=%', 'cursor=%zz', '__proto__[polluted]=yes', '__proto__=x', 'constructor[prototype][polluted]=yes', 'offset=10', 'sort=id', 'limit=5&x=1'),
          fc.string({ minLength: 1, maxLength: 10 }).filter((key) => !names.has(key)).map((key) => encodeQuery([[key, '1']])),
        )
        .map((query) => ({ ...plan, query }));
    },
  },
  {
    name: 'bad-header',
    applies: (e) => e.headers.some((p) => resolve(doc, p.schema).maxLength !== undefined),
    apply: (e, plan) =>
      fc.tuple(fc.constantFrom(...e.headers.filter((p) => resolve(doc, p.schema).maxLength !== undefined)), fc.integer({ min: 1, max: 2_000 })).map(([p, over]) => ({
        ...plan,
        headers: { ...plan.headers, [p.name]: 'k'.repeat(resolve(doc, p.schema).maxLength! + over) },
      })),
  },
  {
    name: 'wrong-method',
    applies: (e) => HTTP_METHODS.some((method) => !e.methodsOfPath.includes(method)),
    apply: (e, plan) => fc.constantFrom(...HTTP_METHODS.filter((method) => !e.methodsOfPath.includes(method))).map((method) => ({ ...plan, method })),
  },
  {
    name: 'malformed-upload',
    applies: isUpload,
    apply: (_, plan) => {
      const file = { filename: 'a.txt', type: 'text/plain', content: 'hello' };
      const complete = multipart(file).payload;
      const multipartType = `multipart/form-data; boundary=${BOUNDARY}`;
      return fc
        .constantFrom<Body>(
          formBody('no parts'),
          formBody('a field and no file', { name: 'purpose', content: 'assistants' }),
          formBody('the file under another name', { ...file, name: 'upload' }),
          formBody('two files', file, { ...file, filename: 'b.txt' }),
          formBody('the file and a field', file, { name: 'purpose', content: 'x' }),
          raw(() => complete.subarray(0, complete.length - 12), 'cut before the closing boundary', multipartType),
          raw(() => complete, 'no boundary parameter', 'multipart/form-data'),
          raw(() => 'not multipart at all', 'garbage', multipartType),
          raw(() => '', 'empty', multipartType),
        )
        .map((body) => ({ ...plan, body }));
    },
  },
];

/**
 * Mutated requests: a mutation first (each as likely as the next), then an operation it applies to, then a
 * valid request to that operation, which the mutation spoils.
 */
function mutatedPlan(validPlans: Map<Endpoint, fc.Arbitrary<Plan>>): fc.Arbitrary<Plan> {
  return fc.oneof(
    ...MUTATIONS.map((mutation) =>
      fc.oneof(
        ...endpoints
          .filter((e) => mutation.applies(e))
          .map((e) => validPlans.get(e)!.chain((plan) => mutation.apply(e, plan)).map((plan) => planOf({ ...plan, kind: mutation.name, mustReject: true }))),
      ),
    ),
  );
}

// ---- tokens that must not authenticate ----

function badTokens(deletedUsersToken: string): string[] {
  const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: user.id, email: user.email, ver: 0 };
  const signed = (payload: object, key = TEST_SECRET, expiresIn: number | undefined = 60_000) =>
    createSigner({ key, algorithm: 'HS256', ...(expiresIn ? { expiresIn } : {}) })(payload);
  const [header, payload, signature] = user.token.split('.') as [string, string, string];
  const tampered = `${header}.${payload}.${signature.slice(0, 10)}${signature[10] === 'A' ? 'B' : 'A'}${signature.slice(11)}`;
  return [
    '',
    'Bearer',
    'Bearer ',
    'Basic dXNlcjpwYXNzd29yZA==',
    `Token ${user.token}`,
    `Bearer ${tampered}`,
    `Bearer ${user.token}.x`,
    `Bearer ${b64({ alg: 'none', typ: 'JWT' })}.${b64({ ...claims, iat: now, exp: now + 600 })}.`,
    `Bearer ${signed(claims, 'another-secret-that-is-long-enough-for-hs256-000')}`,
    `Bearer ${signed({ ...claims, iat: now - 7200, exp: now - 3600 }, TEST_SECRET, undefined)}`,
    `Bearer ${signed({ email: user.email, ver: 0 })}`,
    `Bearer ${signed({ ...claims, sub: "' OR '1'='1" })}`,
    `Bearer ${signed({ ...claims, ver: 99 })}`,
    `Bearer ${deletedUsersToken}`,
    `Bearer ${'x'.repeat(8_000)}`,
  ];
}

// ---- sending and checking ----

interface Outcome {
  plan: Plan;
  status: number;
  failures: string[];
}

async function send(plan: Plan, pool: Pool): Promise<Outcome> {
  const params = resolveParams(plan, pool);
  const path = plan.endpoint.path.replace(/\{(\w+)\}/g, (_, name: string) => params[name]!);
  const headers: Record<string, string> = { ...plan.headers };
  if (plan.auth === 'user') headers.authorization = user.auth.authorization;
  else if (plan.auth !== 'none') headers.authorization = plan.auth.header;
  let payload: string | Buffer | undefined;
  if (plan.body && 'json' in plan.body) {
    if (plan.body.json !== undefined) {
      payload = JSON.stringify(plan.body.json);
      headers['content-type'] = 'application/json';
    }
  } else if (plan.body) {
    payload = plan.body.raw();
    if (plan.body.contentType !== undefined) headers['content-type'] = plan.body.contentType;
  }
  const response = await t.app.inject({ method: plan.method as 'GET', url: plan.query ? `${path}?${plan.query}` : path, headers, payload });
  return { plan, status: response.statusCode, failures: check(plan, response) };
}

/** The methods that change nothing stored. */
const READS = ['GET', 'HEAD'];

/** What is wrong with a HEAD's error: the headers of its GET's problem+json, and no body. */
function headViolations(response: { headers: Record<string, unknown>; body: string }): string[] {
  const type = String(response.headers['content-type'] ?? '');
  return [...(type.startsWith('application/problem+json') ? [] : [`content-type ${type}`]), ...(response.body === '' ? [] : ['a HEAD answered with a body'])];
}

/** What is wrong with one answer: any 5xx, an error that is not the contract's problem+json, an undocumented status, an accepted mutation. */
function check(plan: Plan, response: { statusCode: number; headers: Record<string, unknown>; body: string }): string[] {
  const status = response.statusCode;
  const failures: string[] = [];
  if (status >= 500) failures.push(`a ${status} (logged: ${loggedErrorOf(response.headers['x-request-id'])})`);
  if (!response.headers['x-request-id']) failures.push('no x-request-id');
  if (status >= 400 && plan.method === 'HEAD') failures.push(...headViolations(response));
  else if (status >= 400) failures.push(...problemViolations(response));
  if (plan.mustReject && (status < 400 || status >= 500)) failures.push(`mutated request answered ${status}, not a 4xx`);
  // A request with a method the path does not have reaches no operation (404 route not found).
  const routed = plan.method === plan.endpoint.method;
  if (routed && !plan.endpoint.statuses.has(status)) failures.push(`status ${status} is not documented for ${plan.endpoint.name}`);
  if (routed && status < 300) {
    const documented = Object.keys(plan.endpoint.operation.responses[String(status)]?.content ?? {});
    const type = String(response.headers['content-type'] ?? '');
    const matches = (media: string) => media === '*/*' || type.startsWith(media.replace(/\*$/, ''));
    if (documented.length ? !documented.some(matches) : response.body !== '') {
      failures.push(`content-type ${type || 'none'} is not documented (${documented.join(', ') || 'no content'})`);
    }
  }
  return failures.map((failure) => `${failure}: ${describe(plan)} -> ${status} ${clip(response.body, 400)}`);
}

/** What the server logged about the failure of the request `requestId`: the error and where it was thrown. */
function loggedErrorOf(requestId: unknown): string {
  const line = errorLog.lines.find((entry) => entry.reqId === requestId && entry.err);
  const err = line?.err as { type?: string; message?: string; stack?: string } | undefined;
  return err ? `${err.type}: ${err.message} ${clip(err.stack?.split('\n').slice(1, 6).join(' ') ?? '', 600)}` : 'nothing';
}

/** Runs `work` over `items`, `limit` at a time, results in order. */
async function inParallel<T, R>(items: T[], limit: number, work: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await work(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: limit }, worker));
  return results;
}

/** Keeps the caller's resources from running out as generated requests delete them. */
async function topUp(pool: Pool): Promise<Pool> {
  if (pool.projects.length < 3) {
    for (let i = pool.projects.length; i < 3; i++) await createProject(t.app, user, { name: `fuzz project ${i}` });
    return topUp(await loadPool());
  }
  const projectId = pool.projects[0]!;
  if ((pool.children.promptId!.get(projectId) ?? []).length < 2) await createPrompt(t.app, user, projectId);
  if ((pool.children.fileId!.get(projectId) ?? []).length < 1) await uploadFile(user, projectId);
  const history = await t.testDb.database.db.select({ id: messages.id }).from(messages).where(eq(messages.projectId, projectId)).limit(2);
  if (history.length < 2) await insertMessages(t.testDb.database.db, projectId, 2);
  return loadPool();
}

async function uploadFile(owner: RegisteredUser, projectId: string): Promise<string> {
  const { payload, headers } = multipart({ filename: 'seed.txt', type: 'text/plain', content: 'seed file' });
  const response = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/files`, headers: { ...owner.auth, ...headers }, payload });
  if (response.statusCode !== 201) throw new Error(`upload failed: ${response.statusCode} ${response.body}`);
  return (response.json() as { id: string }).id;
}

const PROTOTYPES = { Object: Object.prototype, Array: Array.prototype, Function: Function.prototype, String: String.prototype };
const prototypeKeys = () => Object.fromEntries(Object.entries(PROTOTYPES).map(([name, prototype]) => [name, Reflect.ownKeys(prototype).map(String).sort()]));

it('answers every generated and mutated request of every operation: no 5xx, problem+json for every 4xx, and a refused request changes nothing stored', async () => {
  const prototypesBefore = prototypeKeys();
  const h = hints();
  const validPlans = new Map(endpoints.map((e) => [e, validPlan(e, h)]));
  const generated = fc.oneof(
    ...endpoints.map((e) => {
      const hostile = hostilePlan(e, validPlans.get(e)!);
      return hostile ? fc.oneof(validPlans.get(e)!, hostile) : validPlans.get(e)!;
    }),
  );
  const batch = (kind: 'generated' | 'mutated', plan: fc.Arbitrary<Plan>) =>
    fc.array(plan, { minLength: BATCH_SIZE, maxLength: BATCH_SIZE }).map((plans) => ({ kind, plans }));
  const batches = fc.oneof({ weight: 1, arbitrary: batch('generated', generated) }, { weight: 3, arbitrary: batch('mutated', mutatedPlan(validPlans)) });

  const byStatus: Record<string, number> = {};
  const byKind: Record<string, number> = {};
  const reached = new Map<string, { generated: number; mutated: number; succeeded: number }>(endpoints.map((e) => [e.name, { generated: 0, mutated: 0, succeeded: 0 }]));
  let requests = 0;
  let unchangedBatches = 0;
  let verifiedUnchanged = 0;
  const seed = Number(process.env.FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
  const startedAt = performance.now();

  await fc.assert(
    fc.asyncProperty(batches, async ({ kind, plans }) => {
      const pool = await topUp(await loadPool());
      t.fake.requests.length = 0;
      const before = await readState();
      const outcomes = await inParallel(plans, PARALLEL, (plan) => send(plan, pool));
      const after = await readState();

      const failures = outcomes.flatMap((outcome) => outcome.failures);
      // A batch in which nothing succeeded (all of a mutated one must not) leaves everything as it was.
      const succeeded = outcomes.filter((outcome) => outcome.status < 300 && !READS.includes(outcome.plan.method));
      if (succeeded.length === 0) {
        unchangedBatches++;
        verifiedUnchanged += plans.length;
        const changed = Object.keys(before).filter((key) => before[key] !== after[key]);
        if (changed.length) failures.push(`refused requests changed what is stored (${changed.join(', ')}); the batch:\n  ${plans.map(describe).join('\n  ')}`);
        if (t.fake.requests.length) failures.push(`refused requests called the provider ${t.fake.requests.length} times: ${t.fake.requests.map((r) => r.path).join(', ')}`);
      }

      for (const outcome of outcomes) {
        requests++;
        byStatus[outcome.status] = (byStatus[outcome.status] ?? 0) + 1;
        byKind[outcome.plan.kind] = (byKind[outcome.plan.kind] ?? 0) + 1;
        const counts = reached.get(outcome.plan.endpoint.name)!;
        counts[kind]++;
        if (outcome.status < 300 && outcome.plan.method === outcome.plan.endpoint.method) counts.succeeded++;
      }
      if (failures.length) throw new Error(`${failures.length} failure(s):\n${failures.slice(0, 10).join('\n')}`);
    }),
    // A failure names its seed; FUZZ_SEED=<seed> generates the same requests again.
    { numRuns: BATCHES, endOnFailure: true, seed },
  );
  const seconds = (performance.now() - startedAt) / 1000;

  expect(requests).toBeGreaterThanOrEqual(MIN_REQUESTS);
  // Every operation of the document was sent both kinds.
  expect([...reached].filter(([, counts]) => counts.generated === 0 || counts.mutated === 0).map(([name]) => name)).toEqual([]);
  expect(unchangedBatches).toBeGreaterThanOrEqual(BATCHES / 2);
  // No pollution of the prototypes, by a body, a query or anything else.
  expect(prototypeKeys()).toEqual(prototypesBefore);
  expect(({} as Record<string, unknown>).polluted).toBeUndefined();

  process.stdout.write(
    `fuzz: ${JSON.stringify({
      seed,
      requests,
      seconds: Math.round(seconds),
      perSecond: Math.round(requests / seconds),
      routes: reached.size,
      routesWithout2xx: [...reached].filter(([, counts]) => counts.succeeded === 0).map(([name]) => name),
      batches: BATCHES,
      unchangedBatches,
      verifiedUnchanged,
      byStatus,
      byKind,
    })}\n`,
  );
}, 600_000);
