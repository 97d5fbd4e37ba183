import { isUtf8 } from 'node:buffer';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Socket } from 'node:net';
import fastifyCompress from '@fastify/compress';
import fastifyCors from '@fastify/cors';
import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction, RequestPayload, RouteOptions } from 'fastify';
import type { Config } from '../config.js';
import { FORM_FRAMING_BYTES, SMALL_BODY_LIMIT_BYTES } from './body-limits.js';
import { answeredBeforeItsBody, ApiError } from './errors.js';
import { registerLoadShedding } from './load-shedding.js';
import { DOCUMENT_HEADERS } from './security-headers.js';

/** More bytes of an answer than a socket's buffers take at once, so that a client that reads none holds them. */
const HELD_BY_A_STALLED_CLIENT = 64 * 1024;

/**
 * A client that takes nothing of a large answer for `stallMs` is disconnected, as a stream's client is
 * (src/modules/chat/sse.ts): one that never reads would otherwise keep the answer in memory (a page of
 * long prompts or messages: up to 60 MB of JSON), or a download its file open, for as long as it kept
 * its connection. The socket's timer restarts whenever bytes move, so a slow client that reads is not
 * cut; once the answer is written, Node puts its keep-alive bound in its place.
 */
function disconnectStalledClients(stallMs: number) {
  return (request: FastifyRequest, _reply: FastifyReply, payload: unknown, done: (error: null, payload: unknown) => void): void => {
    const size = payload == null ? 0 : typeof payload === 'string' || Buffer.isBuffer(payload) ? payload.length : Infinity;
    // A request made by `inject` has a socket of its own kind, with nothing to time.
    const { socket } = request.raw;
    if (size > HELD_BY_A_STALLED_CLIENT && socket instanceof Socket) socket.setTimeout(stallMs);
    done(null, payload);
  };
}

/**
 * A body sent with a content coding (`Content-Encoding: gzip`): request bodies are never decompressed
 * (see `globalDecompression` below), and parsing the compressed bytes as JSON or a form would answer a
 * misleading 400. RFC 9110 (8.4, 12.5.3): 415, naming the one coding accepted.
 */
class EncodedBody extends ApiError {
  constructor() {
    super(415, 'UNSUPPORTED_MEDIA_TYPE', 'Request bodies are accepted uncompressed only: send it without Content-Encoding', {}, {
      'accept-encoding': 'identity',
    });
  }
}

/**
 * The parameters of a Content-Type, one after another (RFC 9110 5.6.6): a name, and a value quoted or
 * not, so that `charset=` within another's quoted value is no parameter. A value ends at a comma too,
 * as in the `a; charset=utf-8, a` of a client that names the type twice.
 */
const PARAMETER = /;\s*([^=;\s]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;,\s]*))/g;
/** UTF-8 under its names, and ASCII, which is UTF-8 too. */
const UTF8_LABELS = new Set(['utf-8', 'utf8', 'us-ascii', 'ascii']);

function charsetOf(contentType: string): string | undefined {
  for (const [, name, quoted, token] of contentType.matchAll(PARAMETER)) {
    if (name!.toLowerCase() === 'charset') return (quoted ?? token)!.toLowerCase();
  }
  return undefined;
}

/**
 * Why a JSON body is not read, if it is not. It is read as UTF-8, the only encoding of JSON between
 * systems (RFC 8259 8.1). One that names another charset (`utf-16`, `latin1`) is 415 (RFC 9110
 * 15.5.16), not read as UTF-8: its text would be another text, stored as if sent, or a misleading 400.
 * Bytes that are not UTF-8 are 400: decoded, each bad sequence would become U+FFFD, so that passwords of
 * different bytes were one password, and a text stored was not the text sent.
 */
export function jsonBodyRefusal(contentType: string | undefined, body: Buffer): ApiError | undefined {
  const charset = contentType === undefined ? undefined : charsetOf(contentType);
  if (charset && !UTF8_LABELS.has(charset)) return new ApiError(415, 'UNSUPPORTED_MEDIA_TYPE', 'JSON is read as UTF-8: send it with charset=utf-8, or no charset');
  if (!isUtf8(body)) return new ApiError(400, 'VALIDATION_ERROR', 'The body is not valid UTF-8, the encoding of JSON (RFC 8259)');
  return undefined;
}

const BODY_METHODS = new Set(['POST', 'PUT', 'PATCH']);

/** Whether a route reads a body: one of a method that has one, or a body of its own (DELETE /auth/me). */
export function takesBody(route: Pick<RouteOptions, 'method' | 'schema'>): boolean {
  return Boolean(route.schema?.body) || [route.method].flat().some((method) => BODY_METHODS.has(method));
}

/**
 * A preParsing hook of the routes that take no body but may be sent one (a DELETE): an empty body is no
 * body, whatever Content-Type names. fetch names an empty string body `text/plain`, curl's `-d ''` a
 * form, and Fastify, finding no parser for either, answered a valid delete 415. A body that is there is
 * parsed, so it is refused as any other if it is encoded.
 */
function ignoreEmptyBodyType(request: FastifyRequest, reply: FastifyReply, payload: RequestPayload, done: (error: Error | null, payload?: RequestPayload) => void): void {
  const { headers } = request;
  const length = headers['content-length'];
  if (headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')) {
    refuseEncodedBody(request, reply, payload, done);
    return;
  }
  delete headers['content-type'];
  done(null, payload);
}

/** A preParsing hook of the routes that take a body: refuses it before reading it if it is encoded. */
function refuseEncodedBody(request: FastifyRequest, reply: FastifyReply, payload: RequestPayload, done: (error: Error | null, payload?: RequestPayload) => void): void {
  const coding = request.headers['content-encoding'];
  // A list (RFC 9110, 8.4), whose empty elements and `identity` apply no coding.
  const codings = coding?.split(',').filter((element) => !['', 'identity'].includes(element.trim().toLowerCase()));
  if (!codings?.length) {
    done(null, payload);
    return;
  }
  done(new EncodedBody());
}

/**
 * How long, at most, the rest of a body longer than its route takes (or of no declared length) is read
 * and dropped after the answer, before its connection is closed. A proxy that buffers request bodies
 * (nginx does by default) sends a body whole before it reads the answer: closed under it, with bytes
 * unread, the connection was reset, and the proxy answered its own 502 in place of the service's 413 or
 * 401. Not longer: the rest of a body of any length, read at the wire's speed, is work for nothing.
 */
const LINGER_MS = 5_000;

/**
 * An onSend hook of the routes that may be sent a body: after the answer to a request refused before its
 * body had all come (a token refused, a rate limit, an encoded body, an upload to a full project, a file
 * too large), the body's rest is read to its end and dropped, its connection kept. Closed under a client
 * still sending, with bytes unread, a connection is reset, and a client still writing (fetch sending
 * FormData or a stream, as generated clients do; a proxy that buffered the body) got EPIPE in place of
 * its answer. A body declared no longer than `limit` bytes, what the route takes, may take until
 * REQUEST_TIMEOUT_MS as any other; a longer one, or one of no declared length, `lingerMs`, after which
 * its connection is closed. (One whose client waits for 100 Continue and was not told to go on is
 * closed after the answer: Node's doing.)
 */
function endBodyAfterAnswer(limit: number, lingerMs: number) {
  return (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (error: null, payload: unknown) => void): void => {
    const { raw } = request;
    if (!raw.complete) {
      // Fastify says `connection: close` after a body its parser refused (too large), whose rest may still
      // come: read and dropped here instead. Only Fastify's: a server closing says it on the response
      // itself, and removing a header the response does not have would stop Node writing its own.
      if (reply.hasHeader('connection') && !reply.raw.hasHeader('connection')) reply.removeHeader('connection');
      answeredBeforeItsBody(raw);
      // A form's parser that had begun no longer takes it; and a stream its backpressure paused stays
      // paused until told otherwise.
      raw.unpipe();
      raw.resume();
      if (!(Number(request.headers['content-length']) <= limit)) closeUnlessEndedWithin(raw, lingerMs);
    }
    done(null, payload);
  };
}

/** Closes the connection of `request` if its body has not ended within `ms` (destroying a request whose body has not ended destroys its socket). */
function closeUnlessEndedWithin(request: IncomingMessage, ms: number): void {
  const timer = setTimeout(() => request.destroy(), ms).unref();
  const stop = () => {
    clearTimeout(timer);
    request.off('end', stop);
    request.off('close', stop);
  };
  request.once('end', stop);
  request.once('close', stop);
}

const CONTINUED = Symbol('100 Continue sent');

/**
 * Tells a client that waits for it (`Expect: 100-continue`, as curl sends with a large body) to send its
 * body, once the request is known to be worth it: Node would tell it at once, before the token, the
 * project or its room were checked, and a refused upload was sent whole all the same (up to
 * FILE_MAX_BYTES) for nothing. Sent once; nothing for a client that did not ask.
 */
export function sendContinue(request: FastifyRequest, reply: FastifyReply): void {
  const raw = request.raw as FastifyRequest['raw'] & { [CONTINUED]?: true };
  if (raw[CONTINUED] || request.headers.expect?.toLowerCase() !== '100-continue') return;
  raw[CONTINUED] = true;
  reply.raw.writeContinue();
}

/** A preParsing hook of the routes Fastify reads the body of: their checks before it (a token, a rate limit) are done. */
function continueToBody(request: FastifyRequest, reply: FastifyReply, payload: RequestPayload, done: (error: Error | null, payload?: RequestPayload) => void): void {
  sendContinue(request, reply);
  done(null, payload);
}

/** A route that reads its own body (an upload: multipart), after checks of its own, and sends `sendContinue` itself. */
const readsOwnBody = (route: RouteOptions) => Boolean(route.schema?.consumes?.includes('multipart/form-data'));

/** An onRequest hook for the routes that answer HTML: registered in the scope of the docs UI. */
export function sendDocumentHeaders(_request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
  reply.headers(DOCUMENT_HEADERS);
  done();
}

/** What a browser's script may read of a response besides the safelisted headers. */
const CORS_EXPOSED_HEADERS = ['x-request-id', 'retry-after', 'content-disposition', 'location', 'etag', 'content-range', 'idempotent-replayed'];

const corsOrigin = (origins: string[]) => (origins.includes('*') ? '*' : origins);

/**
 * What @fastify/cors's hook sets on the response to an allowed origin, for the answers given where no
 * hook of it runs: the router's own errors (a path that is not valid percent-encoding) and the 503 of a
 * request that arrives while the app closes (refused by the first hook). Without them a browser reads
 * neither the problem nor the 503's Retry-After, only a failed fetch. Undefined when CORS is off.
 */
export function corsOutsideHooks(config: Pick<Config, 'CORS_ORIGINS'>): ((request: FastifyRequest, reply: FastifyReply) => void) | undefined {
  if (!config.CORS_ORIGINS) return undefined;
  const origin = corsOrigin(config.CORS_ORIGINS);
  const exposed = CORS_EXPOSED_HEADERS.join(', ');
  return (request, reply) => {
    if (origin !== '*') reply.header('vary', 'Origin');
    const allowed = origin === '*' ? '*' : origin.find((one) => one === request.headers.origin);
    if (allowed) reply.header('access-control-allow-origin', allowed);
    reply.header('access-control-expose-headers', exposed);
  };
}

/**
 * Load shedding, CORS, compression, and the refusal of compressed request bodies.
 * Registered before authentication, so that a saturated server refuses work before doing any and CORS
 * preflights (which carry no token) are answered.
 */
export async function registerHardening(app: FastifyInstance, config: Config): Promise<void> {
  if (config.MAX_EVENT_LOOP_DELAY_MS > 0) registerLoadShedding(app, config.MAX_EVENT_LOOP_DELAY_MS);

  if (config.CORS_ORIGINS) {
    await app.register(fastifyCors, {
      origin: corsOrigin(config.CORS_ORIGINS),
      // Clients authenticate with a bearer token, never a cookie: credentials are never allowed,
      // which is also what makes `*` safe.
      credentials: false,
      methods: ['GET', 'HEAD', 'POST', 'PATCH', 'DELETE'],
      // And a download's range and validators (see src/modules/files/ranges.ts).
      allowedHeaders: ['authorization', 'content-type', 'idempotency-key', 'x-request-id', 'range', 'if-range', 'if-none-match', 'if-match'],
      exposedHeaders: CORS_EXPOSED_HEADERS,
      maxAge: 600,
      // A strict preflight without Origin would be answered 400 in plain text, outside problem+json.
      strictPreflight: false,
    });
  }

  // On the routes that take a body, or may be sent an empty one, only: the others, /health/live among
  // them, do not pay for it.
  app.addHook('onRoute', (route) => {
    const hook = takesBody(route) ? refuseEncodedBody : [route.method].flat().includes('DELETE') ? ignoreEmptyBodyType : undefined;
    if (!hook) return;
    const continued = readsOwnBody(route) ? [] : [continueToBody];
    route.preParsing = [...[route.preParsing ?? []].flat(), hook, ...continued];
    const limit = readsOwnBody(route) ? config.FILE_MAX_BYTES + FORM_FRAMING_BYTES : (route.bodyLimit ?? SMALL_BODY_LIMIT_BYTES);
    route.onSend = [...[route.onSend ?? []].flat(), endBodyAfterAnswer(limit, Math.min(LINGER_MS, config.REQUEST_TIMEOUT_MS))];
  });
  // Node answers `Expect: 100-continue` itself unless the server listens for it: the request is then
  // served as any other, and told to go on when its body is to be read (`sendContinue`).
  app.server.on('checkContinue', (request: IncomingMessage, response: ServerResponse) => app.server.emit('request', request, response));

  // As long as a stream's client may take nothing: the provider's own bound (`AI_TIMEOUT_MS`).
  app.addHook('onSend', disconnectStalledClients(config.AI_TIMEOUT_MS));

  await app.register(fastifyCompress, {
    global: true,
    threshold: 1024,
    // JSON and text; never event streams (hijacked replies skip onSend anyway) nor uploaded bytes.
    customTypes: /^text\/(?!event-stream)|[+/]json(?:;|$)/u,
    // Request bodies are not decompressed: they are small JSON, and inflating them is work a client could multiply.
    globalDecompression: false,
  });
}
