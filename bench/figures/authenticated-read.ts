import { expectOk } from '../chat.js';
import type { Figure } from '../figure.js';
import { compareThroughput, cpuNotes, meanRps } from '../load.js';
import { mean } from '../stats.js';

const CONNECTIONS = 50;
const TARGET_RATIO = 0.8;

export const authenticatedRead: Figure = {
  number: 2,
  title: 'Authenticated read',
  async run(bench) {
    const baseline = await bench.fastifyPg();
    const path = `/api/v1/projects/${bench.seed.readProjectId}`;
    const { rounds: results } = await compareThroughput(
      {
        ours: {
          pid: bench.service.pid,
          load: { url: `${bench.service.url}${path}`, connections: CONNECTIONS, headers: { authorization: bench.service.authorization } },
        },
        'bare Fastify + pg': { pid: baseline.pid, load: { url: `${baseline.url}${path}`, connections: CONNECTIONS } },
      },
      { rounds: 3, seconds: 5, warmupSeconds: 2, meters: bench.databaseCpu },
    );
    const ours = results.ours!;
    const bare = results['bare Fastify + pg']!;

    const trips = await bench.countRoundTrips('GET /api/v1/projects/:projectId', async (probe) =>
      expectOk(await probe.client.request('GET', path), 'get project'),
    );
    const roundTrips = trips === undefined ? '' : `; ${trips} database round trips per request (the baseline: 1)`;
    return [
      {
        figure: 2,
        measure: `GET /api/v1/projects/:id, ${CONNECTIONS} connections`,
        unit: 'req/s',
        ours: meanRps(ours),
        baseline: { name: 'bare Fastify route, same SQL, pg', value: meanRps(bare) },
        target: { on: 'ratio', atLeast: TARGET_RATIO },
        notes: cpuNotes(results) + roundTrips,
        details: results,
      },
      {
        figure: 2,
        measure: 'the same, p99 latency',
        unit: 'ms',
        ours: mean(ours.map((result) => result.p99Ms)),
        baseline: { name: 'bare Fastify route', value: mean(bare.map((result) => result.p99Ms)) },
      },
    ];
  },
};
