import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyReply, FastifyRequest } from 'fastify';
import helmet from 'helmet';

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
export const DOCUMENT_HEADERS = helmetHeaders();

/**
 * The headers of every other response (JSON, problem+json, downloads): the ones the OWASP REST Security
 * Cheat Sheet lists for an API, `Cache-Control: no-store` first (tokens, accounts, conversations: no
 * cache on the way, nor the browser's, keeps a copy; a download says what it allows itself). The rest of helmet's (a CSP for scripts and styles, referrer, opener and
 * embedder policies, DNS prefetch, IE's download options) tell a browser how to treat a page it renders,
 * and an API response is not one; they were most of the bytes of a small response, and Node checks every
 * header of every response again. What stays: HSTS; nosniff, so that a body is only ever its declared
 * type; and a policy under which a response that a browser renders after all loads nothing, runs nothing
 * and is framed by no one (X-Frame-Options for browsers older than frame-ancestors).
 */
export const API_HEADERS: Record<string, string> = {
  'cache-control': 'no-store',
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'strict-transport-security': DOCUMENT_HEADERS['strict-transport-security']!,
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
};

/**
 * What every response carries: its request id (the contract's `x-request-id`) and the API's headers above
 * (an HTML page's own replace them). Set by the first hook of every request, and by what answers before
 * any hook has run.
 */
export function setResponseHeaders(request: FastifyRequest, reply: FastifyReply): void {
  reply.headers(API_HEADERS).header('x-request-id', request.id);
}
