import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { z } from 'zod';
import { serializerCompiler } from '../../src/http/serialization.js';
import { session } from '../../src/modules/auth/schemas.js';
import { chatResult } from '../../src/modules/chat/schemas.js';
import { filePage } from '../../src/modules/files/schemas.js';
import { messagePage } from '../../src/modules/messages/schemas.js';
import { projectPage } from '../../src/modules/projects/schemas.js';
import { promptPage } from '../../src/modules/prompts/schemas.js';

const compile = (schema: z.ZodType) => serializerCompiler({ schema, method: 'GET', url: '/test' });

const id = fc.uuid({ version: 7 });
const time = fc.date({ min: new Date('2000-01-01'), max: new Date('2100-01-01'), noInvalidDate: true }).map((date) => date.toISOString());
// Any UTF-16: quotes, backslashes, control characters, lone surrogates, characters outside the BMP.
const text = fc.string({ unit: 'binary', maxLength: 60 });
const count = fc.nat();
const nullable = <T>(value: fc.Arbitrary<T>) => fc.option(value, { nil: null });
// What a handler may leave on a row besides the DTO's fields: none of it may be written.
const secrets = { passwordHash: fc.constant('$2b$12$never-written'), userId: id };

const usage = fc.record({ promptTokens: count, completionTokens: count, totalTokens: count });
const message = fc.record({
  id,
  projectId: id,
  role: fc.constantFrom('user', 'assistant', 'system'),
  content: text,
  status: fc.constantFrom('complete', 'incomplete', 'failed'),
  model: nullable(text),
  usage: nullable(usage),
  createdAt: time,
  ...secrets,
});
const pageOf = <T>(item: fc.Arbitrary<T>) => fc.record({ data: fc.array(item, { maxLength: 4 }), nextCursor: nullable(text) });

const bodies: [string, z.ZodType, fc.Arbitrary<unknown>][] = [
  [
    'a page of projects',
    projectPage,
    pageOf(
      fc.record({
        id,
        name: text,
        description: nullable(text),
        provider: fc.constantFrom(null, 'openai', 'openrouter'),
        model: nullable(text),
        createdAt: time,
        updatedAt: time,
        counts: fc.record({ prompts: count, messages: count, files: count }),
        ...secrets,
      }),
    ),
  ],
  ['a page of prompts', promptPage, pageOf(fc.record({ id, projectId: id, title: text, content: text, createdAt: time, updatedAt: time, ...secrets }))],
  ['a page of messages', messagePage, pageOf(message)],
  ['a chat turn', chatResult, fc.record({ userMessage: message, assistantMessage: message, usage: nullable(usage) })],
  [
    'a page of files',
    filePage,
    pageOf(
      fc.record({
        id,
        projectId: id,
        filename: text,
        mimeType: text,
        size: count,
        sha256: fc.stringMatching(/^[0-9a-f]{64}$/),
        providerFileId: nullable(text),
        createdAt: time,
        ...secrets,
      }),
    ),
  ],
  ['a session', session, fc.record({ token: text, user: fc.record({ id, email: text, name: text, createdAt: time, ...secrets }) })],
];

describe('the compiled response serializer', () => {
  it.each(bodies)('writes %s as the schema reads it: its fields, in its order, and nothing else', (_name, schema, body) => {
    const serialize = compile(schema);
    fc.assert(
      fc.property(body, (value) => {
        const written = serialize(value);
        // The oracle: zod's own reading of the value (unknown keys dropped), written by JSON.stringify.
        expect(written).toBe(JSON.stringify(schema.parse(value)));
        expect(written).not.toContain('never-written');
      }),
      { numRuns: 200 },
    );
  });

  it('refuses a body without a field the schema requires, rather than write an incomplete one', () => {
    const serialize = compile(chatResult);
    expect(() => serialize({ userMessage: null, usage: null })).toThrow();
  });
});
