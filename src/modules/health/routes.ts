import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Database } from '../../db/database.js';
import { problemBody, sendProblem } from '../../http/errors.js';

const healthy = z.object({ status: z.literal('ok'), checks: z.object({ database: z.literal('ok') }) });

/** GET /health/live's one possible answer. */
const LIVE = { status: 'ok' } as const;

/**
 * `stopping`: aborted once the process is told to stop (server.ts). Readiness fails from then on, while
 * SHUTDOWN_DELAY_MS keeps the server serving, so that load balancers take it out before it stops listening.
 */
export const healthRoutes: FastifyPluginAsyncZod<{ database: Database; stopping?: AbortSignal }> = async (app, { database, stopping }) => {
  // Checks at the same time share one ping, whose failure is logged once: a flood of /health (a probe
  // misconfigured, any client: the route takes no token) queued a query each in the pool, ahead of the
  // requests it serves, until the pings themselves timed out and reported the database down.
  let pinging: Promise<void> | undefined;
  const ping = () =>
    (pinging ??= database
      .ping()
      .catch((error: unknown) => {
        app.log.warn({ err: error }, 'health check: database down');
        throw error;
      })
      .finally(() => (pinging = undefined)));

  app.get(
    '/health',
    { config: { public: true }, schema: { tags: ['health'], operationId: 'getHealth', response: { 200: healthy } } },
    async (request, reply) => {
      if (stopping?.aborted) return sendProblem(reply, problemBody(request, 503, 'SERVICE_UNAVAILABLE', 'The server is shutting down'));
      try {
        await ping();
        return { status: 'ok' as const, checks: { database: 'ok' as const } };
      } catch {
        // Every 5xx is problem+json; `checks` is an extension member telling which dependency failed.
        const problem = problemBody(request, 503, 'SERVICE_UNAVAILABLE', 'The database is unavailable', {
          checks: { database: 'down' },
        });
        return sendProblem(reply, problem);
      }
    },
  );

  app.get(
    '/health/live',
    {
      // Liveness: answered while the process serves, even while it sheds load (a restart would not help).
      // An orchestrator's probes are not traffic: they stay out of the request metrics.
      config: { public: true, servedUnderPressure: true, metrics: false },
      schema: { tags: ['health'], operationId: 'getLiveness', response: { 200: z.object({ status: z.literal('ok') }) } },
      // 15 bytes, far under the threshold: compression would only look at it.
      compress: false,
    },
    (_request, reply) => {
      reply.send(LIVE);
    },
  );
};
