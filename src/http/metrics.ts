import { createHash, timingSafeEqual } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { finished } from 'node:stream';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import { z } from 'zod';
import type { Database, PoolStats } from '../db/database.js';
import type { ProviderRetry, Usage } from '../providers/types.js';
import { bearerToken } from './auth.js';
import { PROBLEM_STATUS, type ProblemCode, Unauthorized } from './errors.js';
import { userIdOf } from './logging.js';
import { streamFailure } from './stream-failures.js';

/** One finished call to an AI provider, as the metered adapter reports it. */
export interface ProviderCall {
  provider: string;
  model: string;
  operation: 'complete' | 'stream';
  seconds: number;
  /**
   * `ok`, `aborted` (the client left and the call was cut), or the problem code it failed with and what
   * failed it (the upstream's status, `quota`, `connection`, `answer`, `timeout`).
   */
  outcome: 'ok' | 'aborted' | { code: ProblemCode; reason: string };
  usage: Usage | null;
}

export interface Metrics {
  /** Counts an open server-sent events stream until `response` closes. */
  trackStream(response: ServerResponse): void;
  recordProviderCall(call: ProviderCall): void;
  /** Counts a failed try of a provider call that is tried again (a call is recorded once, retries included). */
  countProviderRetry(retry: ProviderRetry): void;
  /** Counts a request the router refused (a malformed path, an over-long parameter) once it is answered: no hook runs for it. */
  countRefused(request: FastifyRequest, reply: FastifyReply): void;
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: Metrics;
  }
  interface FastifyContextConfig {
    /** `false`: the route's requests are not in the request metrics (liveness probes, which are not traffic). */
    metrics?: boolean;
  }
}

/** The label of requests that matched no route: their URLs are whatever a client sent. */
const UNMATCHED_ROUTE = 'unmatched';
const CLIENT_CLOSED_REQUEST = PROBLEM_STATUS.CLIENT_CLOSED_REQUEST;
/** The label of a model the server does not know (see `registerMetrics`). */
const OTHER_MODEL = 'other';

let processRegistry: Registry | undefined;

/**
 * Process and event-loop metrics (CPU, memory, GC, handles, event-loop lag) describe the process, not
 * one application in it, and collecting them starts monitors that are never stopped: collected once.
 */
function processMetrics(): Registry {
  if (!processRegistry) {
    processRegistry = new Registry();
    collectDefaultMetrics({ register: processRegistry });
  }
  return processRegistry;
}

/**
 * Prometheus metrics at `GET /metrics`: requests by route template and status, AI provider calls,
 * open SSE streams, the database pool, and the process. Labels take route templates and models by the
 * names the server knows them by (`knownName`), never URLs or other client-chosen text: a project's
 * model is free text its owner chose, shown to nobody else (and `/metrics` takes no user's token), so
 * any other model is `other`. The number of series stays bounded too. With `token` (METRICS_TOKEN), a
 * scrape must send it as a bearer token.
 */
export function registerMetrics(app: FastifyInstance, database: Database, knownName: (model: string) => string | undefined, token?: string): Metrics {
  const registry = new Registry();
  const registers = [registry];

  const requests = new Histogram({
    name: 'http_request_duration_seconds',
    help: 'HTTP requests by method, route template and status; _count is the number of requests',
    labelNames: ['method', 'route', 'status'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers,
  });
  const openStreams = new Gauge({ name: 'sse_streams_open', help: 'Server-sent event streams open now', registers });
  const providerCalls = new Histogram({
    name: 'ai_provider_request_duration_seconds',
    help: 'AI provider calls (retries included) by provider, model, operation and outcome (ok, error, aborted)',
    labelNames: ['provider', 'model', 'operation', 'outcome'] as const,
    buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120],
    registers,
  });
  const providerTokens = new Counter({
    name: 'ai_provider_tokens_total',
    help: 'Tokens the AI providers reported, by provider, model and type (prompt, completion)',
    labelNames: ['provider', 'model', 'type'] as const,
    registers,
  });
  const providerErrors = new Counter({
    name: 'ai_provider_errors_total',
    help: 'Failed AI provider calls by provider, model, problem code and reason (the upstream status, quota, connection, answer, timeout)',
    labelNames: ['provider', 'model', 'code', 'reason'] as const,
    registers,
  });
  const providerRetries = new Counter({
    name: 'ai_provider_retries_total',
    help: 'Failed tries of AI provider calls that were tried again, by provider and reason (the upstream status, or connection)',
    labelNames: ['provider', 'reason'] as const,
    registers,
  });
  if (database.poolStats) registerPoolMetrics(registry, database.poolStats);
  const scraped = Registry.merge([processMetrics(), registry]);
  const modelLabel = (model: string) => knownName(model) ?? OTHER_MODEL;

  const observe = (request: FastifyRequest, reply: FastifyReply, status: number) =>
    requests.observe({ method: request.method, route: request.routeOptions.url ?? UNMATCHED_ROUTE, status }, reply.elapsedTime / 1000);
  const answered = new WeakSet<FastifyRequest>();
  // The one per-request cost: a single histogram observation once the response is sent.
  app.addHook('onResponse', (request, reply, done) => {
    if (request.routeOptions.config.metrics !== false) {
      observe(request, reply, streamFailure(reply)?.status ?? reply.statusCode);
      answered.add(request);
    }
    done();
  });
  // A response whose client has gone before it was written whole emits neither 'finish' nor 'error', and
  // no onResponse hook runs for it: it is counted when it closes, as 499 (nginx's "client closed
  // request"), and logged. On the routes measured only (not /health/live, which orchestrators probe).
  const watchAbandoned = (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    reply.raw.once('close', () => {
      if (answered.has(request)) return;
      observe(request, reply, CLIENT_CLOSED_REQUEST);
      request.log.info({ req: request, userId: userIdOf(request), responseTime: reply.elapsedTime }, 'request abandoned: its connection closed before the answer');
    });
    done();
  };
  app.addHook('onRoute', (route) => {
    if (route.config?.metrics !== false) route.onRequest = [...[route.onRequest ?? []].flat(), watchAbandoned];
  });

  app.get(
    '/metrics',
    {
      config: { public: true, servedUnderPressure: true },
      schema: {
        tags: ['operations'],
        operationId: 'getMetrics',
        summary: 'Prometheus metrics (text exposition format)',
        description: 'No user’s token. With METRICS_TOKEN set, `Authorization: Bearer <METRICS_TOKEN>`; without it, 401.',
        response: { 200: { content: { 'text/plain': { schema: z.string() } } } },
        ...(token !== undefined && { security: [{ metricsToken: [] }], problems: ['UNAUTHORIZED'] }),
      },
      onRequest: token === undefined ? [] : [requireBearer(token)],
    },
    async (_request, reply) => reply.type(scraped.contentType).send(await scraped.metrics()),
  );

  const metrics: Metrics = {
    trackStream(response) {
      openStreams.inc();
      // Called back once however the response ends (finished, client gone), even if it already has.
      finished(response, () => openStreams.dec());
    },
    countRefused(request, reply) {
      reply.raw.once('finish', () => observe(request, reply, reply.statusCode));
    },
    recordProviderCall({ provider, model, operation, seconds, outcome, usage }) {
      const label = modelLabel(model);
      providerCalls.observe({ provider, model: label, operation, outcome: typeof outcome === 'string' ? outcome : 'error' }, seconds);
      if (typeof outcome === 'object') providerErrors.inc({ provider, model: label, code: outcome.code, reason: outcome.reason });
      if (usage) {
        providerTokens.inc({ provider, model: label, type: 'prompt' }, usage.promptTokens);
        providerTokens.inc({ provider, model: label, type: 'completion' }, usage.completionTokens);
      }
    },
    countProviderRetry: ({ provider, reason }) => providerRetries.inc({ provider, reason }),
  };
  app.decorate('metrics', metrics);
  return metrics;
}

/** The onRequest check of `token`, compared in constant time (digests of equal length, whatever was sent). */
function requireBearer(token: string) {
  const digest = (text: string) => createHash('sha256').update(text).digest();
  const expected = digest(token);
  const refused = () => new Unauthorized('The metrics take METRICS_TOKEN as a bearer token');
  return async (request: FastifyRequest) => {
    let sent: string;
    try {
      sent = bearerToken(request);
    } catch {
      throw refused();
    }
    if (!timingSafeEqual(digest(sent), expected)) throw refused();
  };
}

function registerPoolMetrics(registry: Registry, poolStats: () => PoolStats): void {
  new Gauge({
    name: 'db_pool_connections',
    help: 'PostgreSQL pool connections by state (busy, idle)',
    labelNames: ['state'] as const,
    registers: [registry],
    collect() {
      const { total, idle } = poolStats();
      this.set({ state: 'busy' }, total - idle);
      this.set({ state: 'idle' }, idle);
    },
  });
  new Gauge({
    name: 'db_pool_waiting_queries',
    help: 'Queries waiting for a free PostgreSQL pool connection',
    registers: [registry],
    collect() {
      this.set(poolStats().waiting);
    },
  });
}

