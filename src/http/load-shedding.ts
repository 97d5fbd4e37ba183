import { monitorEventLoopDelay } from 'node:perf_hooks';
import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import { ApiError } from './errors.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Answered even while the server sheds load (liveness, metrics): they are how an operator sees it. */
    servedUnderPressure?: boolean;
  }
}

const OVERLOADED_RETRY_AFTER_SECONDS = 10;
/** How finely the event loop's delay is sampled; a delay is what is measured over it. */
const RESOLUTION_MS = 10;
/** How often the mean delay is taken, and the measure started again. */
const SAMPLE_EVERY_MS = 1000;

class Overloaded extends ApiError {
  constructor() {
    super(503, 'SERVICE_UNAVAILABLE', 'The server is overloaded; try again shortly', {}, {
      'retry-after': String(OVERLOADED_RETRY_AFTER_SECONDS),
    });
  }
}

/**
 * Refuses requests with 503 while the event loop's mean delay over the last second is over
 * `maxDelayMs`, rather than answering all of them late. The check is an onRequest hook of each route
 * that is not `servedUnderPressure`, put there as the route is added (before authentication's, so that
 * a saturated server does no work for a request it refuses): the routes that are served anyway carry no
 * hook at all, as @fastify/under-pressure's one hook for every request could not (and it built the
 * route's options object for each request to read that flag). Being a route's, it leaves out what costs
 * nothing to answer: an unknown route's 404, and a CORS preflight (answered by @fastify/cors's own hook,
 * which runs before any route's).
 */
export function registerLoadShedding(app: FastifyInstance, maxDelayMs: number): void {
  const delays = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  delays.enable();
  let meanDelayMs = 0;
  const sample = setInterval(() => {
    // No sample at all in a whole second: the loop was blocked all along.
    meanDelayMs = delays.count === 0 ? Infinity : Math.max(0, delays.mean / 1e6 - RESOLUTION_MS);
    delays.reset();
  }, SAMPLE_EVERY_MS).unref();
  app.addHook('onClose', async () => {
    clearInterval(sample);
    delays.disable();
  });

  const shed = (_request: FastifyRequest, _reply: FastifyReply, done: HookHandlerDoneFunction) => {
    done(meanDelayMs > maxDelayMs ? new Overloaded() : undefined);
  };
  app.addHook('onRoute', (route) => {
    if (route.config?.servedUnderPressure) return;
    route.onRequest = [shed, ...[route.onRequest ?? []].flat()];
  });
}
