import fastifySwagger, { type SwaggerTransform } from '@fastify/swagger';
import fastifySwaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance, FastifySchema, RouteOptions } from 'fastify';
import { jsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { BEARER_CHALLENGE, PROBLEM_STATUS, type ProblemCode } from './errors.js';
import { sendDocumentHeaders, takesBody } from './hardening.js';
import { pathOf } from './query-start.js';
import { rateLimitGroupOf } from './rate-limit.js';

declare module 'fastify' {
  interface FastifySchema {
    /**
     * Problem codes the route answers with besides the ones every route like it may (see
     * `problemCodesOf`). Documentation only: error bodies are not serialized through a schema.
     */
    problems?: readonly ProblemCode[];
    /**
     * The body of a route that reads its own (a multipart upload), as the document shows it.
     * Documentation only: Fastify never validates it, as it would a `body`.
     */
    documentedBody?: z.ZodType;
    /** Headers a route's own responses carry, by status, besides the ones every response does. Documentation only. */
    responseHeaders?: Record<string, Record<string, { type: 'string' | 'integer'; description: string }>>;
  }
}

/** The response of a route that answers without a body (204). */
export const noContent = z.undefined().describe('No content');

/** The codes a response can carry: not CLIENT_CLOSED_REQUEST, whose client is gone before it (logs and metrics only). */
const problemCodes = Object.keys(PROBLEM_STATUS).filter((code) => code !== 'CLIENT_CLOSED_REQUEST') as [ProblemCode, ...ProblemCode[]];

/** RFC 9457 problem details, the body of every 4xx and 5xx (see src/http/errors.ts). */
export const problem = z
  .looseObject({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    code: z.enum(problemCodes).describe('Stable and machine-readable'),
    detail: z.string(),
    instance: z.string(),
    requestId: z.string().describe('The x-request-id of the response'),
    errors: z
      .array(z.object({ path: z.string(), message: z.string() }))
      .optional()
      .describe('Only on VALIDATION_ERROR: each invalid field, e.g. `body.name`'),
    userMessageId: z.uuid().optional().describe('A failed chat: the stored question, kept whatever happened'),
    retryAfter: z
      .number()
      .int()
      .optional()
      .describe('PROVIDER_RATE_LIMITED: the seconds of its Retry-After, also in a stream’s error event, which no header can carry'),
  })
  .meta({ id: 'Problem', description: 'RFC 9457 problem details (application/problem+json)' });

/** Where the document keeps a schema with an id (`.meta({ id })`): for a place no route's schema puts it. */
export const schemaReference = (schema: z.ZodType) => ({ $ref: `#/components/schemas/${String(schema.meta()?.id)}` });

const retryAfter = {
  'Retry-After': { type: 'integer', description: 'Seconds to wait before trying again (429, and 503 when known)' },
};

/** What a 201 names (RFC 9110 §15.3.2: without it, a 201 says that it made the request's own URL). */
const location = {
  Location: { type: 'string', description: 'The path of what was created' },
};

const requestId = {
  'X-Request-Id': { type: 'string', description: 'The request’s id: the one it sent (1–128 of `A-Za-z0-9_.:-`), or one made for it' },
};

const challenge = {
  'WWW-Authenticate': { type: 'string', description: `The scheme the API takes: \`${BEARER_CHALLENGE}\`` },
};

/**
 * The problem codes a route can answer with: the ones that follow from what it is (authenticated,
 * rate limited, taking input, naming a resource, taking a body) plus those its schema lists.
 */
function problemCodesOf(route: RouteOptions, schema: FastifySchema): Set<ProblemCode> {
  const config = route.config ?? {};
  // Any request, before it reaches a route: malformed HTTP or no Host (400), headers over the limit (431),
  // a request too slow to arrive (408).
  const codes = new Set<ProblemCode>(['VALIDATION_ERROR', 'HEADERS_TOO_LARGE', 'REQUEST_TIMEOUT', ...(schema.problems ?? [])]);
  if (!config.public) codes.add('UNAUTHORIZED');
  if (route.url.includes(':')) codes.add('NOT_FOUND');
  const readsBody = takesBody({ method: route.method, schema });
  // A DELETE is parsed like any request with a body: one it was sent anyway may be too large, or of a type it does not read.
  if (readsBody || [route.method].flat().includes('DELETE')) {
    codes.add('PAYLOAD_TOO_LARGE');
    codes.add('UNSUPPORTED_MEDIA_TYPE');
  }
  // What it stores may find no room (a full disk).
  if (readsBody) codes.add('INSUFFICIENT_STORAGE');
  if (rateLimitGroupOf(config)) codes.add('RATE_LIMITED');
  codes.add('INTERNAL');
  // Shed under pressure unless served under it; and during a drain (SIGTERM), every route.
  codes.add('SERVICE_UNAVAILABLE');
  return codes;
}

/** One problem+json response per status, naming the codes it can carry. */
function problemResponses(codes: Set<ProblemCode>) {
  const byStatus = new Map<number, ProblemCode[]>();
  for (const code of codes) {
    const status = PROBLEM_STATUS[code];
    byStatus.set(status, [...(byStatus.get(status) ?? []), code]);
  }
  return Object.fromEntries(
    [...byStatus].map(([status, statusCodes]) => [
      status,
      {
        description: `Problem details; \`code\`: ${statusCodes.map((code) => `\`${code}\``).join(', ')}`,
        content: { 'application/problem+json': { schema: problem } },
      },
    ]),
  );
}

/**
 * Each route's document from its own Zod schemas (fastify-type-provider-zod), with the problem
 * responses it can answer with and its security: bearer auth unless the route is public. Applied to
 * every route as the document is built, so a new route is documented with no step of its own.
 */
const documentRoute: SwaggerTransform = (input) => {
  const { problems: _listed, documentedBody, responseHeaders = {}, ...schema } = input.schema ?? {};
  const codes = problemCodesOf(input.route, input.schema ?? {});
  const withProblems = {
    ...schema,
    ...(documentedBody && { body: documentedBody }),
    response: { ...problemResponses(codes), ...(schema.response as object | undefined) },
  };
  const transformed = jsonSchemaTransform({ ...input, schema: withProblems });
  if (transformed.schema.hide) return transformed;
  const responses = transformed.schema.response as Record<string, { headers?: object }>;
  const headersOf: Record<string, object> = { '429': retryAfter, '503': retryAfter, '401': challenge, '201': location };
  for (const [status, response] of Object.entries(responses)) response.headers = { ...requestId, ...headersOf[status], ...responseHeaders[status] };
  // A public route needs no user's token; one may name a credential of its own (`/metrics`).
  const security = input.route.config?.public && transformed.schema.security === undefined ? { security: [] } : {};
  const document = { ...transformed.schema, ...security };
  return { url: transformed.url, schema: input.route.method === 'HEAD' ? asHead(document) : document };
};

/**
 * The HEAD of a GET, which Fastify answers on every GET route (RFC 9110 §9.3.2): the GET's document
 * without bodies, named after it (`getProjectHead`; @fastify/swagger's own suffix, `-head`, is no
 * identifier a generated client can use).
 */
function asHead(schema: FastifySchema & { operationId?: string }): FastifySchema {
  const responses = Object.entries(schema.response as Record<string, { description?: string; headers?: object }>);
  // A response of type null is one without content, to @fastify/swagger.
  const withoutBody = (status: string, { description, headers }: { description?: string; headers?: object }) => ({
    type: 'null',
    description: status.startsWith('2') ? 'The GET’s headers, without its body' : description,
    headers,
  });
  return {
    ...schema,
    operationId: schema.operationId && `${schema.operationId.replace(/-head$/, '')}Head`,
    response: Object.fromEntries(responses.map(([status, response]) => [status, withoutBody(status, response)])),
  };
}

type SchemaObject = { type?: unknown; nullable?: boolean; enum?: unknown[]; allOf?: { $ref?: string }[]; anyOf?: object[] };
type Document = { components?: { schemas?: Record<string, SchemaObject> } };

/** The document as fastify-type-provider-zod writes it, then finished by the two steps below. */
const finishedDocument: typeof jsonSchemaTransformObject = (input) => {
  const document = jsonSchemaTransformObject(input) as Document;
  writeNullables(document);
  dropUnusedSchemas(document);
  return document as ReturnType<typeof jsonSchemaTransformObject>;
};

/** The id of the component schema that a `$ref` names, if it names one. */
const referencedId = (ref: unknown) => (typeof ref === 'string' ? /^#\/components\/schemas\/(.+)$/.exec(ref)?.[1] : undefined);

/**
 * Writes each nullable reference and each nullable enum so that null is valid under OpenAPI 3.0.3, which
 * takes `nullable` as allowing null only where the rest of the schema does too:
 * - Zod's `.nullable()` of a schema with an id is written `{ nullable: true, allOf: [{ $ref }] }`: 3.0.3
 *   takes `nullable` only beside a `type`, and the reference's own type holds under `allOf` whatever
 *   `nullable` says, so that a validator of the answers (ajv, Schemathesis) refused the null the service
 *   sends (a message's `usage`, null for a user's message). Written instead as either the reference or
 *   null alone.
 * - A nullable enum lists null among its values: without it, validators refused a project's `provider`
 *   null (the server's default), and generators typed it as never null, so that no typed client could
 *   send the null that resets it.
 */
function writeNullables(document: Document): void {
  const schemas = document.components?.schemas ?? {};
  const visit = (value: unknown): void => {
    if (typeof value !== 'object' || value === null) return;
    for (const child of Object.values(value)) visit(child);
    const schema = value as SchemaObject;
    if (schema.nullable && schema.enum && !schema.enum.includes(null)) schema.enum.push(null);
    const [only, ...others] = schema.allOf ?? [];
    const referenced = schema.nullable && schema.type === undefined && others.length === 0 ? referencedId(only?.$ref) : undefined;
    const type = referenced && schemas[referenced]?.type;
    if (!type) return;
    delete schema.nullable;
    delete schema.allOf;
    schema.anyOf = [only!, { type, nullable: true, enum: [null] }];
  };
  visit(document);
}

/**
 * Drops the schemas no operation uses. fastify-type-provider-zod writes each schema with an id twice, as
 * read (`ProjectInput`) and as written (`Project`), whichever the routes use: a generated client got two
 * near-twin types of each, the unused one looser.
 */
function dropUnusedSchemas(document: Document): void {
  const schemas = document.components?.schemas ?? {};
  const used = new Set<string>();
  const visit = (value: unknown): void => {
    if (typeof value !== 'object' || value === null) return;
    const id = referencedId((value as { $ref?: unknown }).$ref);
    if (id !== undefined && !used.has(id)) {
      used.add(id);
      visit(schemas[id]);
    }
    for (const child of Object.values(value)) visit(child);
  };
  visit({ ...document, components: { ...document.components, schemas: undefined } });
  for (const id of Object.keys(schemas)) if (!used.has(id)) delete schemas[id];
}

/** The UI's page, with the slash its relative links need. */
const DOCS_ROOT = '/docs/';

/**
 * OpenAPI 3 at `GET /openapi.json`, generated from the Zod schemas that validate the requests, and
 * Swagger UI at `GET /docs`. Register before any route: the document lists the routes registered after it.
 */
export async function registerOpenApi(app: FastifyInstance): Promise<void> {
  await app.register(fastifySwagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'Chatbot platform API',
        version: '1.0.0',
        description:
          'Projects (chatbots) with system prompts, chat through OpenAI-compatible providers (JSON or server-sent events) and files. ' +
          'Every error is application/problem+json (RFC 9457) with a stable `code`.',
      },
      tags: [
        { name: 'auth', description: 'Accounts, and the tokens that act for them' },
        { name: 'projects', description: 'Projects, each one a chatbot or agent' },
        { name: 'prompts', description: 'A project’s system prompts' },
        { name: 'chat', description: 'A turn with a project’s model, answered as JSON or as server-sent events' },
        { name: 'messages', description: 'A project’s conversation' },
        { name: 'files', description: 'Files attached to a project' },
        { name: 'health', description: 'Readiness and liveness' },
        { name: 'operations', description: 'Metrics, and this document' },
      ],
      components: {
        securitySchemes: {
          bearerAuth: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' },
          metricsToken: { type: 'http', scheme: 'bearer', description: 'The METRICS_TOKEN of the server’s configuration' },
        },
      },
      security: [{ bearerAuth: [] }],
    },
    exposeHeadRoutes: true,
    transform: documentRoute,
    transformObject: finishedDocument,
  });

  // The UI's own routes (page, assets, a copy of the document) are public and left out of the document.
  // They serve an HTML page and what it loads: a page's security headers, not an API response's.
  await app.register(async (docs) => {
    docs.addHook('onRoute', (route) => {
      route.config = { ...route.config, public: true };
    });
    docs.addHook('onRequest', sendDocumentHeaders);
    // The router takes a path with a slash at its end as the path without it, but the UI's redirect from
    // `static/index.html` reads the path as sent, and sent `static/index.html/` back to itself for ever:
    // under /docs such a path is sent to the path without the slash first.
    docs.addHook('onRequest', (request, reply, done) => {
      const path = pathOf(request.url);
      if (path.length > DOCS_ROOT.length && path.endsWith('/')) reply.redirect(path.slice(0, -1) + request.url.slice(path.length), 308);
      else done();
    });
    await docs.register(fastifySwaggerUi, { routePrefix: '/docs' });
  });

  app.get(
    '/openapi.json',
    {
      config: { public: true },
      schema: {
        tags: ['operations'],
        operationId: 'getOpenApiDocument',
        summary: 'This OpenAPI document',
        response: { 200: z.looseObject({ openapi: z.string() }).describe('OpenAPI 3 document') },
      },
    },
    () => app.swagger() as { openapi: string },
  );
}
