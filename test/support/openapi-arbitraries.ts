import fc from 'fast-check';
import { PROBLEM_STATUS } from '../../src/http/errors.js';

/**
 * fast-check arbitraries derived from the service's own OpenAPI document (`GET /openapi.json`): valid
 * values for each operation's parameters and body, values of the wrong type or out of bounds, hostile
 * strings and raw JSON texts no serializer would write (deep nesting, prototype keys, invalid UTF-8).
 * Domain knowledge the document cannot carry (which ids exist, what an email looks like) comes in as
 * hints. `problemViolations` checks an answer against the contract's problem+json shape.
 */

/** The subset of JSON Schema (OpenAPI 3.0 flavour, `nullable`) the document uses. */
export interface JsonSchema {
  type?: string;
  nullable?: boolean;
  enum?: unknown[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  additionalProperties?: boolean | JsonSchema;
  items?: JsonSchema;
  minLength?: number;
  maxLength?: number;
  pattern?: string;
  minimum?: number;
  maximum?: number;
  $ref?: string;
  anyOf?: JsonSchema[];
  oneOf?: JsonSchema[];
  allOf?: JsonSchema[];
}

export interface OpenApiParameter {
  in: 'path' | 'query' | 'header' | 'cookie';
  name: string;
  required?: boolean;
  schema: JsonSchema;
}

export interface OpenApiOperation {
  description?: string;
  security?: unknown[];
  parameters?: OpenApiParameter[];
  requestBody?: { content: Record<string, { schema: JsonSchema }> };
  responses: Record<string, { content?: Record<string, unknown> }>;
}

export interface OpenApiDocument {
  paths: Record<string, Record<string, OpenApiOperation>>;
  components?: { schemas?: Record<string, JsonSchema> };
}

/** One operation of the document and what a request to it is made of. */
export interface Endpoint {
  /** As `POST /api/v1/projects/{projectId}/prompts`. */
  name: string;
  method: string;
  /** The path template, `{name}` for each path parameter. */
  path: string;
  operation: OpenApiOperation;
  pathParams: OpenApiParameter[];
  query: OpenApiParameter[];
  headers: OpenApiParameter[];
  /** The schema of the JSON body, when the operation takes one. */
  body?: JsonSchema;
  /** Bearer auth: every operation but those whose `security` is empty. */
  authenticated: boolean;
  /** Every status the document lists for the operation. */
  statuses: Set<number>;
  /** Every method the document lists for the same path. */
  methodsOfPath: string[];
}

export function endpointsOf(doc: OpenApiDocument): Endpoint[] {
  return Object.entries(doc.paths).flatMap(([path, item]) =>
    Object.entries(item).map(([method, operation]): Endpoint => {
      const parameters = operation.parameters ?? [];
      const body = operation.requestBody?.content['application/json']?.schema;
      return {
        name: `${method.toUpperCase()} ${path}`,
        method: method.toUpperCase(),
        path,
        operation,
        pathParams: parameters.filter((p) => p.in === 'path'),
        query: parameters.filter((p) => p.in === 'query'),
        headers: parameters.filter((p) => p.in === 'header'),
        ...(body ? { body: resolve(doc, body) } : {}),
        authenticated: !(Array.isArray(operation.security) && operation.security.length === 0),
        statuses: new Set(Object.keys(operation.responses).map(Number)),
        methodsOfPath: Object.keys(item).map((m) => m.toUpperCase()),
      };
    }),
  );
}

/** Follows a `$ref` into the document's components. */
export function resolve(doc: OpenApiDocument, schema: JsonSchema): JsonSchema {
  if (!schema.$ref) return schema;
  const name = schema.$ref.replace('#/components/schemas/', '');
  const target = doc.components?.schemas?.[name];
  if (!target) throw new Error(`unresolved ${schema.$ref}`);
  return resolve(doc, target);
}

/** By property or parameter name: an arbitrary used instead of the one the schema would give. */
export type Hints = Record<string, fc.Arbitrary<unknown>>;

/** Longest random string generated for a schema (its maxLength itself is tried at the boundary). */
const TYPICAL_MAX_LENGTH = 40;

/** `length` characters: `seed` repeated, so that a boundary-length string costs no per-character generation. */
const repeatTo = (seed: string, length: number) => seed.repeat(Math.ceil(length / Math.max(seed.length, 1))).slice(0, length);

/** Strings the schema allows: short ones of any printable graphemes mostly, and both boundary lengths. */
function validString(schema: JsonSchema): fc.Arbitrary<string> {
  if (schema.pattern) return fc.stringMatching(new RegExp(schema.pattern));
  const min = schema.minLength ?? 0;
  const max = schema.maxLength ?? min + TYPICAL_MAX_LENGTH;
  const typical = fc.string({ unit: 'grapheme', minLength: min, maxLength: Math.min(max, min + TYPICAL_MAX_LENGTH) });
  // Boundaries counted in UTF-16 units (as Zod counts): ASCII only.
  const ascii = fc.string({ unit: 'grapheme-ascii', minLength: 1, maxLength: 8 });
  return fc.oneof(
    { weight: 10, arbitrary: typical },
    { weight: 1, arbitrary: ascii.map((seed) => repeatTo(seed, max)) },
    { weight: 1, arbitrary: ascii.map((seed) => repeatTo(seed, min)) },
  );
}

/** Values valid under `schema`, with `hints` taking over for the properties they name. */
export function valueOf(doc: OpenApiDocument, schema: JsonSchema, hints: Hints = {}, name?: string): fc.Arbitrary<unknown> {
  if (name !== undefined && hints[name]) return hints[name];
  const s = resolve(doc, schema);
  const alternatives = s.anyOf ?? s.oneOf;
  let arbitrary: fc.Arbitrary<unknown>;
  if (alternatives) arbitrary = fc.oneof(...alternatives.map((alternative) => valueOf(doc, alternative, hints, name)));
  else if (s.enum) arbitrary = fc.constantFrom(...s.enum);
  else if (s.type === 'string') arbitrary = validString(s);
  else if (s.type === 'boolean') arbitrary = fc.boolean();
  else if (s.type === 'integer') arbitrary = fc.integer({ min: s.minimum ?? -1_000_000, max: s.maximum ?? 1_000_000 });
  else if (s.type === 'number') arbitrary = fc.double({ min: s.minimum ?? -1e9, max: s.maximum ?? 1e9, noNaN: true });
  else if (s.type === 'array') arbitrary = fc.array(valueOf(doc, s.items ?? {}, hints), { maxLength: 5 });
  else if (s.type === 'object' || s.properties) arbitrary = objectOf(doc, s, hints);
  else arbitrary = fc.jsonValue({ maxDepth: 2 });
  return s.nullable ? fc.option(arbitrary, { nil: null, freq: 6 }) : arbitrary;
}

function objectOf(doc: OpenApiDocument, schema: JsonSchema, hints: Hints): fc.Arbitrary<Record<string, unknown>> {
  const properties = schema.properties ?? {};
  const model = Object.fromEntries(Object.entries(properties).map(([key, property]) => [key, valueOf(doc, property, hints, key)]));
  return fc.record(model, { requiredKeys: schema.required ?? [], noNullPrototype: true });
}

const JSON_TYPES = ['string', 'number', 'boolean', 'array', 'object', 'null'] as const;

/** A value of each JSON type; `wrongTypeFor` picks among those the schema does not take. */
const OF_TYPE: Record<(typeof JSON_TYPES)[number], fc.Arbitrary<unknown>> = {
  string: fc.string({ maxLength: 10 }),
  number: fc.oneof(fc.integer(), fc.double({ noNaN: true, noDefaultInfinity: true })),
  boolean: fc.boolean(),
  array: fc.array(fc.jsonValue({ maxDepth: 1 }), { maxLength: 3 }),
  object: fc.dictionary(fc.string({ maxLength: 5 }), fc.jsonValue({ maxDepth: 1 }), { maxKeys: 3, noNullPrototype: true }),
  null: fc.constant(null),
};

/** Values of JSON types `schema` does not accept; undefined when it accepts anything. */
export function wrongTypeFor(doc: OpenApiDocument, schema: JsonSchema): fc.Arbitrary<unknown> | undefined {
  const s = resolve(doc, schema);
  if (!s.type) return undefined;
  const accepted = new Set<string>([s.type === 'integer' ? 'number' : s.type]);
  if (s.nullable) accepted.add('null');
  const wrong = JSON_TYPES.filter((type) => !accepted.has(type));
  return fc.oneof(...wrong.map((type) => OF_TYPE[type]));
}

/** Strings just outside the schema's length bounds (too long, or empty when it needs one character). */
export function outOfBoundsFor(doc: OpenApiDocument, schema: JsonSchema): fc.Arbitrary<string> | undefined {
  const s = resolve(doc, schema);
  if (s.type !== 'string' || s.enum || s.pattern) return undefined;
  const options: fc.Arbitrary<string>[] = [];
  // Letters only: a value that trimming could bring back within bounds would not be out of them.
  if (s.maxLength !== undefined) {
    const max = s.maxLength;
    options.push(fc.tuple(fc.stringMatching(/^[a-z]{1,4}$/), fc.integer({ min: 1, max: 1000 })).map(([seed, over]) => repeatTo(seed, max + over)));
  }
  if ((s.minLength ?? 0) > 0) options.push(fc.constant(''));
  return options.length ? fc.oneof(...options) : undefined;
}

/** Strings an attacker tries: SQL and JSON injection, prototype names, control and odd Unicode characters. */
export const HOSTILE_STRINGS = [
  "' OR '1'='1",
  "'; DROP TABLE users; --",
  '" OR ""="',
  "1; SELECT pg_sleep(5); --",
  "') UNION SELECT password_hash FROM users --",
  "$1",
  '\\',
  "\\'; --",
  '%s%s%s%n',
  '"},"admin":true,"x":{"',
  '","role":"admin',
  '{"$gt":""}',
  '"]}]}',
  '__proto__',
  'constructor',
  'prototype',
  'toString',
  '<script>alert(1)</script>',
  '../../../etc/passwd',
  '${7*7}{{7*7}}',
  'null',
  'NaN',
  '1e309',
  '\r\nSet-Cookie: a=b',
  'a\u0000b',
  '\u0000',
  '\ud800',
  'x\udfffy',
  '\ufeffBOM',
  '\u202eRTL',
  '\u0085\u2028\u2029',
  '😀👨‍👩‍👧‍👦',
  'Ω≈ç√∫˜µ≤≥÷',
  ' ',
  '\t\n',
] as const;

export const hostileString = (): fc.Arbitrary<string> =>
  fc.oneof(
    { weight: 3, arbitrary: fc.constantFrom(...HOSTILE_STRINGS) },
    { weight: 1, arbitrary: fc.string({ unit: 'binary', minLength: 1, maxLength: 20 }) },
  );

/** Byte sequences that are not UTF-8: a lone continuation, a cut sequence, an encoded surrogate, overlong forms. */
export const INVALID_UTF8: readonly (readonly number[])[] = [[0xff], [0xc3], [0x80], [0xed, 0xa0, 0x80], [0xc0, 0xaf], [0xe2, 0x82], [0xf8, 0x88, 0x80, 0x80, 0x80]];

/** JSON text of arrays (or objects) nested `depth` deep. */
export function nestedJson(depth: number, kind: 'array' | 'object'): string {
  return kind === 'array' ? '['.repeat(depth) + ']'.repeat(depth) : '{"a":'.repeat(depth) + '1' + '}'.repeat(depth);
}

/** JSON text of `object` with more members written as given (keys a serializer would drop or refuse). */
export function withRawMembers(object: Record<string, unknown>, members: [key: string, rawValue: string][]): string {
  const base = JSON.stringify(object);
  const extra = members.map(([key, value]) => `${JSON.stringify(key)}:${value}`).join(',');
  if (!extra) return base;
  return base === '{}' ? `{${extra}}` : `${base.slice(0, -1)},${extra}}`;
}

/** A code point no JSON value here contains, marking where `spliceBytes` puts raw bytes. */
export const BYTES_MARKER = '\u{10FFFD}';

/** UTF-8 of `text`, each BYTES_MARKER replaced by `bytes` (which need not be UTF-8 at all). */
export function spliceBytes(text: string, bytes: readonly number[]): Buffer {
  return Buffer.concat(text.split(BYTES_MARKER).flatMap((piece, i) => (i === 0 ? [Buffer.from(piece)] : [Buffer.from(bytes), Buffer.from(piece)])));
}

interface Answer {
  statusCode: number;
  headers: Record<string, unknown>;
  body: string;
}

/**
 * What is wrong with an error answer against the contract: problem+json, `type`, `title`, `status` (the
 * response's), a known `code` that goes with that status, `detail`, `instance`, `requestId` (the
 * x-request-id), and `errors` (only on VALIDATION_ERROR) a list of `{path, message}`. Empty when nothing is.
 */
export function problemViolations(response: Answer): string[] {
  const failures: string[] = [];
  const type = String(response.headers['content-type'] ?? '');
  if (!type.startsWith('application/problem+json')) failures.push(`content-type ${type}`);
  let body: Record<string, unknown>;
  try {
    body = JSON.parse(response.body) as Record<string, unknown>;
  } catch {
    return [...failures, 'body is not JSON'];
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return [...failures, 'body is not an object'];
  for (const key of ['type', 'title', 'detail', 'instance', 'requestId']) {
    if (typeof body[key] !== 'string') failures.push(`${key} is not a string`);
  }
  if (body.status !== response.statusCode) failures.push(`status ${String(body.status)} in the body`);
  const code = body.code as keyof typeof PROBLEM_STATUS;
  if (!(code in PROBLEM_STATUS)) failures.push(`unknown code ${String(code)}`);
  else if (PROBLEM_STATUS[code] !== response.statusCode) failures.push(`code ${code} is not a ${response.statusCode}`);
  if (body.requestId !== response.headers['x-request-id']) failures.push('requestId is not the x-request-id');
  if ('errors' in body) {
    if (code !== 'VALIDATION_ERROR') failures.push(`errors on ${String(code)}`);
    const errors = body.errors;
    const wellFormed = Array.isArray(errors) && errors.every((e) => typeof e?.path === 'string' && typeof e?.message === 'string');
    if (!wellFormed) failures.push('errors is not a list of {path, message}');
  }
  return failures;
}
