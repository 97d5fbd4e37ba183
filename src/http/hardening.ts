import type { IncomingMessage, ServerResponse } from 'node:http';
import fastifyCompress from '@fastify/compress';
import fastifyCors from '@fastify/cors';
import fastifyUnderPressure from '@fastify/under-pressure';
import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import helmet from 'helmet';
import type { Config } from '../config.js';
import { ApiError } from './errors.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Answered even while the server sheds load (liveness, metrics): they are how an operator sees it. */
    servedUnderPressure?: boolean;
  }
}

const OVERLOADED_RETRY_AFTER_SECONDS = 10;

class Overloaded extends ApiError {
  constructor() {
    super(503, 'SERVICE_UNAVAILABLE', 'The server is overloaded; try again shortly', {}, {
      'retry-after': String(OVERLOADED_RETRY_AFTER_SECONDS),
    });
  }
}

/**
 * Helmet's default headers (CSP, HSTS, nosniff, frame, referrer and cross-origin policies), computed
 * once: they depend on no request. @fastify/helmet rebuilds helmet's middleware for every request,
 * which measured here as much CPU as all the rest of a trivial request. Fastify sends no
 * `x-powered-by` to remove.
 */
function helmetHeaders(): Record<string, string> {
  const headers: Record<string, string> = {};
  const response = {
    setHeader: (name: string, value: string | number) => (headers[name.toLowerCase()] = String(value)),
    removeHeader: () => {},
  };
  // Without upgrade-insecure-requests: over plain HTTP on a private network, the one HTML page (/docs)
  // would fetch its own scripts over HTTPS and fail. TLS is the load balancer's job, and HSTS asks for it.
  const options = { contentSecurityPolicy: { directives: { upgradeInsecureRequests: null } } };
  helmet(options)({} as IncomingMessage, response as unknown as ServerResponse, () => {});
  return headers;
}

/** The headers of an HTML page: all of helmet's (the Swagger UI under /docs). */
const DOCUMENT_HEADERS = helmetHeaders();

/**
 * The headers of every other response (JSON, problem+json, downloads): the ones the OWASP REST Security
 * Cheat Sheet lists for an API. The rest of helmet's (a CSP for scripts and styles, referrer, opener and
 * embedder policies, DNS prefetch, IE's download options) tell a browser how to treat a page it renders,
 * and an API response is not one; they were most of the bytes of a small response, and Node checks every
 * header of every response again. What stays: HSTS; nosniff, so that a body is only ever its declared
 * type; and a policy under which a response that a browser renders after all loads nothing, runs nothing
 * and is framed by no one (X-Frame-Options for browsers older than frame-ancestors).
 */
const API_HEADERS: Record<string, string> = {
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'strict-transport-security': DOCUMENT_HEADERS['strict-transport-security']!,
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
};

/** An onRequest hook for the routes that answer HTML: registered in the scope of the docs UI. */
export function sendDocumentHeaders(_request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
  reply.headers(DOCUMENT_HEADERS);
  done();
}

/**
 * Load shedding, security headers, CORS and compression. Registered before authentication, so that a
 * saturated server refuses work before doing any and CORS preflights (which carry no token) are answered.
 */
export async function registerHardening(app: FastifyInstance, config: Config): Promise<void> {
  // First, so that a request shed below is answered with them too.
  app.addHook('onRequest', (_request, reply, done) => {
    reply.headers(API_HEADERS);
    done();
  });

  if (config.MAX_EVENT_LOOP_DELAY_MS > 0) {
    await app.register(fastifyUnderPressure, {
      maxEventLoopDelay: config.MAX_EVENT_LOOP_DELAY_MS,
      // A 503 like every other: problem+json through the error handler, with Retry-After.
      pressureHandler: async (request) => {
        if (!request.routeOptions.config.servedUnderPressure) throw new Overloaded();
      },
    });
  }

  if (config.CORS_ORIGINS) {
    await app.register(fastifyCors, {
      origin: config.CORS_ORIGINS.includes('*') ? '*' : config.CORS_ORIGINS,
      // Clients authenticate with a bearer token, never a cookie: credentials are never allowed,
      // which is also what makes `*` safe.
      credentials: false,
      methods: ['GET', 'HEAD', 'POST', 'PATCH', 'DELETE'],
      allowedHeaders: ['authorization', 'content-type', 'idempotency-key', 'x-request-id'],
      exposedHeaders: ['x-request-id', 'retry-after', 'content-disposition'],
      maxAge: 600,
      // A strict preflight without Origin would be answered 400 in plain text, outside problem+json.
      strictPreflight: false,
    });
  }

  await app.register(fastifyCompress, {
    global: true,
    threshold: 1024,
    // JSON and text; never event streams (hijacked replies skip onSend anyway) nor uploaded bytes.
    customTypes: /^text\/(?!event-stream)|[+/]json(?:;|$)/u,
    // Request bodies are not decompressed: they are small JSON, and inflating them is work a client could multiply.
    globalDecompression: false,
  });
}
