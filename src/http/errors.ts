import { randomUUID } from 'node:crypto';
import { type IncomingMessage, STATUS_CODES } from 'node:http';
import type { Socket } from 'node:net';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Aborter } from '../aborter.js';
import { hasCode } from '../db/error-code.js';
import { pathOf } from './query-start.js';
import { requestIdOf } from './request-id.js';
import { API_HEADERS, setResponseHeaders } from './security-headers.js';

/** The contract's stable problem codes, each with the status it is always sent with. */
export const PROBLEM_STATUS = {
  VALIDATION_ERROR: 400,
  CONTEXT_TOO_LONG: 400,
  UNAUTHORIZED: 401,
  FORBIDDEN: 403,
  NOT_FOUND: 404,
  CONFLICT: 409,
  IDEMPOTENCY_CONFLICT: 409,
  PAYLOAD_TOO_LARGE: 413,
  UNSUPPORTED_MEDIA_TYPE: 415,
  IDEMPOTENCY_MISMATCH: 422,
  RATE_LIMITED: 429,
  INTERNAL: 500,
  PROVIDER_ERROR: 502,
  PROVIDER_NOT_CONFIGURED: 503,
  PROVIDER_RATE_LIMITED: 503,
  SERVICE_UNAVAILABLE: 503,
  PROVIDER_TIMEOUT: 504,
  // Beyond the contract's list, for statuses it names no code for.
  REQUEST_TIMEOUT: 408,
  PRECONDITION_FAILED: 412,
  RANGE_NOT_SATISFIABLE: 416,
  HEADERS_TOO_LARGE: 431,
  INSUFFICIENT_STORAGE: 507,
  // Never sent: its client is gone (nginx's code for that). It says so in the log.
  CLIENT_CLOSED_REQUEST: 499,
} as const;

export type ProblemCode = keyof typeof PROBLEM_STATUS;

/** The first code listed for each status: the general one where a status has several (400, 409, 503). */
const CODE_OF_STATUS = new Map<number, ProblemCode>();
for (const [code, status] of Object.entries(PROBLEM_STATUS) as [ProblemCode, number][]) if (!CODE_OF_STATUS.has(status)) CODE_OF_STATUS.set(status, code);

export interface FieldError {
  path: string;
  message: string;
}

/** RFC 9457 problem details, as every 4xx/5xx body of the API. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  code: ProblemCode;
  detail: string;
  instance: string;
  requestId: string;
  errors?: FieldError[];
  [extension: string]: unknown;
}

/**
 * An error that knows its HTTP status and stable problem code. Services throw these; the one error
 * handler turns them into problem+json. `extensions` become extra members of the problem body
 * (e.g. `userMessageId`), `headers` extra response headers (e.g. `Retry-After`).
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: ProblemCode,
    detail: string,
    readonly extensions: Record<string, unknown> = {},
    readonly headers: Record<string, string> = {},
  ) {
    super(detail);
    this.name = new.target.name;
  }
}

export class ValidationFailed extends ApiError {
  constructor(
    detail: string,
    readonly errors: FieldError[] = [],
  ) {
    super(400, 'VALIDATION_ERROR', detail);
  }
}

/** RFC 9112 (3.2): an HTTP/1.1 request names its Host. */
export class MissingHost extends ValidationFailed {
  constructor() {
    super('An HTTP/1.1 request must carry a Host header', [{ path: 'headers.host', message: 'is required' }]);
  }
}

/** RFC 9110 (11.6.1): a 401 names the scheme that would be accepted; the API's is a bearer token. */
export const BEARER_CHALLENGE = 'Bearer';

export class Unauthorized extends ApiError {
  constructor(detail = 'Missing or invalid credentials') {
    super(401, 'UNAUTHORIZED', detail, {}, { 'www-authenticate': BEARER_CHALLENGE });
  }
}

/**
 * The caller is who its token says, but may not do this: the password an account route checks again
 * (changing it, deleting the account) is wrong. Not a 401: that says the token is no good, and a client
 * that signs its user out on a 401 did so for a typo.
 */
export class Forbidden extends ApiError {
  constructor(detail: string) {
    super(403, 'FORBIDDEN', detail);
  }
}

export class NotFound extends ApiError {
  constructor(what = 'Resource') {
    super(404, 'NOT_FOUND', `${what} not found`);
  }
}

export class Conflict extends ApiError {
  constructor(detail: string) {
    super(409, 'CONFLICT', detail);
  }
}

/** Work given up because its client went away before its answer: nobody would hear it. */
export class ClientGone extends ApiError {
  constructor() {
    super(499, 'CLIENT_CLOSED_REQUEST', 'The client closed its connection before the answer');
  }
}

/**
 * Aborts once the client of `reply` has gone before its answer was written whole: work queued for it
 * need not be done.
 */
export function clientGoneSignal(reply: FastifyReply): AbortSignal {
  const gone = new Aborter();
  const { raw } = reply;
  // With an AbortError, as any caller giving up on a call: what the call then fails with is no error of its own.
  const leave = () => {
    if (!raw.writableFinished) gone.abort();
  };
  if (raw.destroyed) leave();
  else raw.once('close', leave);
  return gone.signal;
}

/** Retry-After of a request refused while the server shuts down: time for a balancer to send it elsewhere. */
const SHUTTING_DOWN_RETRY_SECONDS = 1;

/** A request refused, or a chat turn interrupted, because the server is shutting down. */
export class ShuttingDown extends ApiError {
  constructor() {
    super(503, 'SERVICE_UNAVAILABLE', 'The server is shutting down; try again shortly', {}, { 'retry-after': String(SHUTTING_DOWN_RETRY_SECONDS) });
  }
}

/**
 * A wait as Retry-After gives it: whole seconds (RFC 9110 §10.2.3 has no fractions), and at least one,
 * since 0 would tell the client to come straight back.
 */
export function retryAfterSeconds(seconds: number): number {
  return Math.max(1, Math.ceil(seconds));
}

/**
 * Over a rate limit: 429 with Retry-After, the seconds until the window that refused it ends (or, for a
 * limit with no window, such as chats at once, when trying again is worth it).
 */
export class RateLimited extends ApiError {
  constructor(waitSeconds: number, what = 'Too many requests') {
    const seconds = retryAfterSeconds(waitSeconds);
    super(429, 'RATE_LIMITED', `${what}; retry in ${seconds} s`, {}, { 'retry-after': String(seconds) });
  }
}

/**
 * A failure that came after something was stored which its answer must name (a chat turn's question):
 * answered as `cause` would be, with `extensions` as extra members of the problem.
 */
export class FailureNaming extends Error {
  constructor(
    override readonly cause: unknown,
    readonly extensions: Record<string, unknown>,
  ) {
    // Not the cause's message, which may carry a failed statement's values: the logs redact them in the cause.
    super('The request failed after it stored what its answer names', { cause });
    this.name = new.target.name;
  }
}

export function problemBody(
  request: FastifyRequest,
  status: number,
  code: ProblemCode,
  detail: string,
  extra: Record<string, unknown> = {},
): Problem {
  return {
    type: 'about:blank',
    title: STATUS_CODES[status] ?? 'Error',
    status,
    code,
    detail,
    instance: pathOf(request.url),
    requestId: request.id,
    ...extra,
  };
}

export function sendProblem(reply: FastifyReply, problem: Problem): FastifyReply {
  return reply.code(problem.status).type('application/problem+json').send(problem);
}

/**
 * The database the service ran on dropped, or its login refused (a password rotated, a role revoked):
 * no statement can succeed, whatever the request, and no wait mends it: an operator must. Answered as
 * the database's outage (503), logged as an error.
 */
const MISCONFIGURED_DATABASE_CODES = [
  '3D000', // invalid_catalog_name
  '28P01', // invalid_password
  '28000', // invalid_authorization_specification
];

/** PostgreSQL's query_canceled: a statement past DATABASE_QUERY_TIMEOUT_MS (statement_timeout), rolled back. */
export const QUERY_CANCELED = '57014';

// Error codes of node-postgres / PostgreSQL / sockets that mean "the database is not reachable right now",
// as opposed to a bug in a query.
const DATABASE_DOWN_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  '57P01', // admin_shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '53300', // too_many_connections
  QUERY_CANCELED,
  ...MISCONFIGURED_DATABASE_CODES,
  '08000',
  '08003',
  '08006',
  '08001',
  '08004',
]);

const DATABASE_DOWN_MESSAGES = [
  'Connection terminated',
  'timeout exceeded when trying to connect',
  'Client has encountered a connection error',
  'Cannot use a pool after calling end',
  'database did not answer',
  // A statement unanswered for DATABASE_QUERY_TIMEOUT_MS, and what was queued behind it on its connection.
  'Query read timeout',
  'Client was closed and is not queryable',
  'PGlite is closed',
];

/**
 * A database closed to connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`, for maintenance): 55000,
 * a code that other states share, told apart by the server's function that raised it (its message is in
 * the server's language).
 */
const closedToConnections = (code: unknown, routine: unknown) => code === '55000' && routine === 'CheckMyDatabase';

const FOREIGN_KEY_VIOLATION = '23503';

/** How a 400's detail names the part of the request whose fields its `errors` list. */
const REQUEST_PARTS: Record<string, string> = { body: 'body', querystring: 'query string', params: 'path', headers: 'headers' };

/** The detail of a 400 whose `errors` name fields of the request's `part` (Fastify's `validationContext`). */
export function invalidPart(part: string): string {
  return `The request's ${REQUEST_PARTS[part] ?? part} is not valid: see errors for each field`;
}
// No room left on the disk (or in the quota): where an upload's bytes go, or the database's (53100,
// disk_full: PostgreSQL, or PGlite under DATA_DIR, could not extend a table's file).
const NO_ROOM = ['ENOSPC', 'EDQUOT', '53100'];
// PostgreSQL text cannot hold U+0000 (22021), nor jsonb its escape (22P05): a value the client sent that
// cannot be stored, refused by the statement that would have stored it.
const UNSTORABLE_TEXT = ['22021', '22P05'];

/**
 * Walks an error and its causes (drizzle wraps driver errors) looking for a lost database connection: what
 * said so (the driver's code, or its words), undefined when nothing did. Never a message whole, which may
 * carry a failed statement's values.
 */
export function databaseDownReason(error: unknown): string | undefined {
  for (let e = error, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    const { code, message, routine } = e as { code?: unknown; message?: unknown; routine?: unknown };
    if (typeof code === 'string' && (DATABASE_DOWN_CODES.has(code) || closedToConnections(code, routine))) return code;
    const reason =
      (typeof message === 'string' ? DATABASE_DOWN_MESSAGES.find((m) => message.includes(m)) : undefined) ??
      (e instanceof AggregateError ? (e.errors as unknown[]).map(databaseDownReason).find(Boolean) : undefined);
    if (reason) return reason;
  }
  return undefined;
}

export const isDatabaseUnavailable = (error: unknown): boolean => databaseDownReason(error) !== undefined;

/**
 * Maps Fastify's own error codes (body parsing, content types) to the contract's problem codes, and a
 * detail of its own where Fastify's message would say more than the problem should.
 */
const FASTIFY_ERRORS: Record<string, [number, ProblemCode, string?]> = {
  FST_ERR_CTP_BODY_TOO_LARGE: [413, 'PAYLOAD_TOO_LARGE'],
  FST_REQ_FILE_TOO_LARGE: [413, 'PAYLOAD_TOO_LARGE'],
  FST_FILES_LIMIT: [413, 'PAYLOAD_TOO_LARGE'],
  FST_PARTS_LIMIT: [413, 'PAYLOAD_TOO_LARGE'],
  FST_INVALID_MULTIPART_CONTENT_TYPE: [415, 'UNSUPPORTED_MEDIA_TYPE'],
  // A form field declared `application/json` that is not: the plugin says 406 Not Acceptable, which is
  // about the Accept header; it is a malformed body.
  FST_INVALID_JSON_FIELD_ERROR: [400, 'VALIDATION_ERROR'],
  FST_ERR_CTP_INVALID_MEDIA_TYPE: [415, 'UNSUPPORTED_MEDIA_TYPE'],
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: [400, 'VALIDATION_ERROR'],
  FST_ERR_CTP_EMPTY_JSON_BODY: [400, 'VALIDATION_ERROR'],
  FST_ERR_CTP_INVALID_JSON_BODY: [400, 'VALIDATION_ERROR'],
  FST_ERR_CTP_INVALID_TYPE: [400, 'VALIDATION_ERROR'],
  FST_ERR_CTP_EMPTY_TYPE: [415, 'UNSUPPORTED_MEDIA_TYPE'],
  // Raised by the router, before any route (see frameworkErrors): a path that is not valid
  // percent-encoding, and a path parameter too long to be any id (a malformed id is 404).
  FST_ERR_BAD_URL: [400, 'VALIDATION_ERROR'],
  // Fastify's message quotes the whole path, and tells the router's bound: a foreign id is to be
  // answered as one that does not exist, whatever its length.
  FST_ERR_MAX_PARAM_LENGTH: [404, 'NOT_FOUND', 'Resource not found'],
};

/** How many field errors a 400 lists, and how long each text may be: enough to fix a request by. */
const MAX_FIELD_ERRORS = 50;
const MAX_ERROR_TEXT = 500;

const truncate = (text: string) => (text.length > MAX_ERROR_TEXT ? `${text.slice(0, MAX_ERROR_TEXT - 1)}…` : text);

/** The problem an error answers with: what the error handler sends, and a stream's last event. */
export function toProblem(error: FastifyError | ApiError | Error, request: FastifyRequest): Problem {
  if (error instanceof FailureNaming) {
    const cause = error.cause instanceof Error ? error.cause : new Error(String(error.cause));
    return { ...toProblem(cause, request), ...error.extensions };
  }
  if (error instanceof ValidationFailed) {
    return problemBody(request, 400, 'VALIDATION_ERROR', error.message, { errors: error.errors });
  }
  if (error instanceof ApiError) {
    return problemBody(request, error.status, error.code, error.message, error.extensions);
  }
  const fastifyError = error as FastifyError;
  if (fastifyError.validation) {
    const location = fastifyError.validationContext ?? 'body';
    // Bounded: one issue names every unknown key, and a body may hold tens of thousands of them.
    const errors = fastifyError.validation.slice(0, MAX_FIELD_ERRORS).map((issue) => ({
      path: [location, ...issue.instancePath.split('/').filter(Boolean)].join('.').slice(0, MAX_ERROR_TEXT),
      message: truncate(issue.message ?? 'is invalid'),
    }));
    return problemBody(request, 400, 'VALIDATION_ERROR', invalidPart(location), { errors });
  }
  const known = fastifyError.code ? FASTIFY_ERRORS[fastifyError.code] : undefined;
  if (known) {
    const [status, code, detail] = known;
    // Fastify's own messages for the others are safe and useful ("Body is not valid JSON…").
    return problemBody(request, status, code, detail ?? fastifyError.message);
  }
  if (hasCode(error, FOREIGN_KEY_VIOLATION)) {
    // Every foreign key here points at a parent: a write under a project deleted meanwhile.
    return problemBody(request, 404, 'NOT_FOUND', 'Resource not found');
  }
  if (UNSTORABLE_TEXT.some((code) => hasCode(error, code))) {
    return problemBody(request, 400, 'VALIDATION_ERROR', 'The request contains text that cannot be stored (the NUL character, U+0000)');
  }
  if (NO_ROOM.some((code) => hasCode(error, code))) {
    // RFC 4918 (11.5): the server cannot store what the request needs stored. Nothing of it was kept.
    return problemBody(request, 507, 'INSUFFICIENT_STORAGE', 'The server has no room left to store this; try again later');
  }
  if (request.raw.readableAborted && hasCode(error, 'ECONNRESET')) {
    // The request's own body cut off (its client gone, or too slow for the request timeout): the
    // client's doing, not the database's, whose lost connections carry the same code. Said as a database
    // outage, any client could raise that warning at will.
    const gone = new ClientGone();
    return problemBody(request, gone.status, gone.code, gone.message);
  }
  if (isDatabaseUnavailable(error)) {
    return problemBody(request, 503, 'SERVICE_UNAVAILABLE', 'The database is unavailable; try again shortly');
  }
  const status = fastifyError.statusCode;
  if (status && status >= 400 && status < 500) {
    // Another client error raised by Fastify or a plugin (the docs' static files: 403 for a NUL in the
    // path, 416 for a range past a file): its status with the code that status always comes with, or,
    // for one no code comes with, 400. Never its internals.
    const code = CODE_OF_STATUS.get(status);
    return code ? problemBody(request, status, code, fastifyError.message) : problemBody(request, 400, 'VALIDATION_ERROR', fastifyError.message);
  }
  return problemBody(request, 500, 'INTERNAL', 'An unexpected error occurred');
}

/**
 * Logs an error answered with `problem`, at the level its cause calls for:
 * - a 4xx is the client's: `info`, its code and detail;
 * - a 503 is a refusal the service chose (load shed, hashing queue full, shutting down, the upstream's
 *   rate limit outlasting the retries, no provider configured, the database unreachable): `warn`, its
 *   code and detail (and what said the database was down), no stack, which would be the same for every
 *   refusal, and under load they come by the hundred;
 * - a 502 or 504 we raised (ProviderError, ProviderTimeout) is the upstream's fault: `warn` with the error,
 *   since its cause is what the upstream answered, and may be a bug of ours wrapped as a provider failure;
 * - anything else (500 INTERNAL) was not meant to happen: `error` with the error, stack and causes.
 */
export function logFailure(request: FastifyRequest, error: unknown, problem: Problem, message: string): void {
  const { status, code, detail } = problem;
  if (status < 500) {
    request.log.info({ code, detail }, message);
  } else if (status === 503) {
    const reason = databaseDownReason(error);
    const failed = error instanceof FailureNaming ? error.cause : error;
    // What the upstream answered, for a rate limit that outlasted the retries (its text as quoted, the
    // key redacted), and the question the failure names: what a support ticket starts from.
    const cause = code === 'PROVIDER_RATE_LIMITED' ? (failed as Error).cause : undefined;
    const upstream = cause instanceof Error ? cause.message : undefined;
    const { userMessageId } = problem;
    const level = reason && MISCONFIGURED_DATABASE_CODES.includes(reason) ? 'error' : 'warn';
    request.log[level]({ code, detail, ...(reason && { reason }), ...(upstream && { upstream }), ...(userMessageId !== undefined && { userMessageId }) }, message);
  } else if ((error instanceof FailureNaming ? error.cause : error) instanceof ApiError) {
    request.log.warn({ err: error, code }, message);
  } else {
    request.log.error({ err: error, code }, message);
  }
}

/** Answers an error as problem+json, logged as a failure (5xx) or a rejection (4xx). */
function answerError(error: FastifyError, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  const problem = toProblem(error, request);
  logFailure(request, error, problem, problem.status < 500 ? 'request rejected' : 'request failed');
  if (error instanceof ApiError) reply.headers(error.headers);
  return sendProblem(reply, problem);
}

/**
 * Fastify's `frameworkErrors`: the errors its router raises before a request reaches any route or hook
 * (a path that is not valid percent-encoding, a path parameter over `maxParamLength`), which Fastify
 * would otherwise answer with a JSON body of its own. Hooks do not run for these, hence the request id here.
 */
export function answerFrameworkError(error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  // No hook has run: what the first would have set.
  setResponseHeaders(request, reply);
  answerError(error, request, reply);
}

export function registerErrorHandling(app: FastifyInstance): void {
  app.setErrorHandler(answerError);

  app.setNotFoundHandler((request, reply) =>
    sendProblem(reply, problemBody(request, 404, 'NOT_FOUND', `Route ${request.method} ${pathOf(request.url)} not found`)),
  );
}

/** The connections of requests answered before their bodies had all come, until the rest of each has. */
const answeredEarly = new WeakSet<Socket>();

/** Says that `request` is answered while the rest of its body is read and dropped (see `endBodyAfterAnswer`, hardening.ts). */
export function answeredBeforeItsBody(request: IncomingMessage): void {
  const { socket } = request;
  answeredEarly.add(socket);
  request.once('end', () => answeredEarly.delete(socket));
}

/** Requests Node's HTTP parser refuses, by its error code; anything else it refuses is malformed HTTP. */
const CLIENT_ERRORS: Record<string, [number, ProblemCode, string]> = {
  HPE_HEADER_OVERFLOW: [431, 'HEADERS_TOO_LARGE', 'The request line and headers are over the size limit'],
  ERR_HTTP_REQUEST_TIMEOUT: [408, 'REQUEST_TIMEOUT', 'The request did not arrive in time'],
};

/**
 * Fastify's `clientErrorHandler`: a request that Node's parser refuses (headers over the limit, a
 * malformed request line), or one too slow to arrive. Fastify would answer with a JSON body of its own;
 * this is problem+json like every other 4xx, and the connection closes, as Node's own answer does. A
 * request whose headers had arrived (a body too slow) is named as its route's answers name it: its
 * `x-request-id` echoed, its path the `instance`; one refused before has neither.
 */
export function answerClientError(this: FastifyInstance, error: Error & { code?: string }, socket: Socket): void {
  if (error.code === 'ECONNRESET' || socket.destroyed) return;
  // The rest of a body whose request was answered (see `answeredBeforeItsBody`), too slow to come: that
  // request has its answer, and a second one, with a request id of its own, would follow it on the wire.
  if (answeredEarly.has(socket)) {
    socket.destroy();
    return;
  }
  const [status, code, detail] = CLIENT_ERRORS[error.code ?? ''] ?? [400, 'VALIDATION_ERROR', 'The request is not valid HTTP'];
  // The request the socket is answering, once its headers are parsed: Node's own link from a socket to its response.
  const request = (socket as { _httpMessage?: { req?: IncomingMessage } })._httpMessage?.req;
  const requestId = request ? requestIdOf(request) : randomUUID();
  const instance = request?.url === undefined ? '' : pathOf(request.url);
  const title = STATUS_CODES[status] ?? 'Error';
  const body = JSON.stringify({ type: 'about:blank', title, status, code, detail, instance, requestId });
  // Not the error itself: its rawPacket holds the request's bytes, Authorization header included.
  this.log.info({ code, detail, parserError: error.code, requestId }, 'request rejected');
  if (socket.writable) {
    const head = [
      `HTTP/1.1 ${status} ${title}`,
      'content-type: application/problem+json; charset=utf-8',
      `content-length: ${Buffer.byteLength(body)}`,
      `x-request-id: ${requestId}`,
      ...Object.entries(API_HEADERS).map(([name, value]) => `${name}: ${value}`),
      'connection: close',
    ];
    socket.write(`${head.join('\r\n')}\r\n\r\n${body}`);
  }
  socket.destroy(error);
}
