import type { Figure } from '../figure.js';
import { compareThroughput, cpuNotes, meanRps } from '../load.js';

const CONNECTIONS = 50;
const TARGET_RATIO = 0.9;

export const frameworkFloor: Figure = {
  number: 1,
  title: 'Framework floor',
  async run(bench) {
    const [bareHttp, bareFastify] = [await bench.bareHttp(), await bench.bareFastify()];
    const path = '/health/live';
    // From wrk: autocannon, in JavaScript on the harness's one core, could not keep up with these servers.
    const side = (server: { pid: number; url: string }) => ({
      pid: server.pid,
      load: { url: `${server.url}${path}`, connections: CONNECTIONS, generator: 'wrk' as const },
    });
    const { rounds: results } = await compareThroughput(
      { ours: side(bench.service), 'bare node:http': side(bareHttp), 'bare Fastify': side(bareFastify) },
      { rounds: 3, seconds: 5, warmupSeconds: 2 },
    );
    const nodeHttp = { name: 'bare node:http, same JSON', value: meanRps(results['bare node:http']!) };
    return [
      {
        figure: 1,
        measure: `GET /health/live, ${CONNECTIONS} connections`,
        unit: 'req/s',
        ours: meanRps(results.ours!),
        baseline: nodeHttp,
        target: { on: 'ratio', atLeast: TARGET_RATIO },
        notes: cpuNotes(results),
        details: results,
      },
      {
        // What limits the row above: the framework alone, measured beside it, is not held to the target.
        figure: 1,
        measure: 'the same from a bare Fastify 5 route (no logger, hook or plugin)',
        unit: 'req/s',
        ours: meanRps(results['bare Fastify']!),
        baseline: nodeHttp,
        notes: 'the framework the service is built on, alone: the ceiling of the ratio above',
      },
    ];
  },
};
