import type { Figure } from '../figure.js';
import { compareThroughput, cpuNotes, meanRps } from '../load.js';

const CONNECTIONS = 50;
const TARGET_RATIO = 0.9;

export const frameworkFloor: Figure = {
  number: 1,
  title: 'Framework floor',
  async run(bench) {
    const bare = await bench.bareHttp();
    const path = '/health/live';
    const results = await compareThroughput(
      {
        ours: { pid: bench.service.pid, load: { url: `${bench.service.url}${path}`, connections: CONNECTIONS } },
        'bare node:http': { pid: bare.pid, load: { url: `${bare.url}${path}`, connections: CONNECTIONS } },
      },
      { rounds: 3, seconds: 5, warmupSeconds: 2 },
    );
    return [
      {
        figure: 1,
        measure: `GET /health/live, ${CONNECTIONS} connections`,
        unit: 'req/s',
        ours: meanRps(results.ours!),
        baseline: { name: 'bare node:http, same JSON', value: meanRps(results['bare node:http']!) },
        target: { on: 'ratio', atLeast: TARGET_RATIO },
        notes: cpuNotes(results),
        details: results,
      },
    ];
  },
};
