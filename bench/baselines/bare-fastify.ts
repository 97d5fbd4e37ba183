import Fastify from 'fastify';

/**
 * Figure 1's second, reported baseline: the framework the service is built on with nothing of the
 * service's (no logger, hook, plugin or schema), answering GET /health/live's JSON. Its ratio to bare
 * node:http is the floor that any Fastify application meets in this harness.
 */
const body = JSON.stringify({ status: 'ok' });
const app = Fastify({ logger: false });
app.get('/health/live', (_request, reply) => {
  reply.header('content-type', 'application/json; charset=utf-8').send(body);
});
await app.listen({ port: Number(process.env.PORT), host: '127.0.0.1' });
