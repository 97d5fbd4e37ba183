import { chatBody, chatOnce, chatPath, UPSTREAM_PATH, upstreamBodyOf } from '../chat.js';
import { type Figure, fmt } from '../figure.js';
import { compareThroughput, cpuNotes, meanRps, meanWindowRps, totalErrors } from '../load.js';

const CONNECTIONS = 200;
const UPSTREAM_DELAY_MS = 500;
/** Each client has one chat in flight, each taking the upstream's 500 ms at least. */
const IDEAL_RPS = CONNECTIONS * (1000 / UPSTREAM_DELAY_MS);
const TARGET_SHARE = 0.9;
const WARMUP_SECONDS = 3;

export const chatThroughput: Figure = {
  number: 4,
  title: 'Chat throughput',
  async run(bench) {
    await bench.fake.behave({ delayMs: UPSTREAM_DELAY_MS, chunks: 8, chunkGapMs: 0 });
    const upstreamBody = await upstreamBodyOf(bench, () => chatOnce(bench.service, bench.nextPoolProject()));
    const json = { 'content-type': 'application/json' };
    const { rounds: results, warmup } = await compareThroughput(
      {
        ours: {
          pid: bench.service.pid,
          load: {
            url: bench.service.url,
            connections: CONNECTIONS,
            method: 'POST',
            headers: { ...json, authorization: bench.service.authorization },
            body: chatBody(false),
            // Spread over many projects: each history stays a few messages long.
            nextPath: () => chatPath(bench.nextPoolProject()),
          },
        },
        direct: {
          // The fake upstream's own ceiling: the same load straight at it.
          pid: bench.fake.pid,
          load: { url: `${bench.fake.url}${UPSTREAM_PATH}`, connections: CONNECTIONS, method: 'POST', headers: json, body: upstreamBody },
        },
      },
      { rounds: 2, seconds: 10, warmupSeconds: WARMUP_SECONDS, meters: bench.databaseCpu },
    );
    const ours = results.ours!;
    return [
      {
        figure: 4,
        measure: `chats/s, ${CONNECTIONS} clients, upstream answering after ${UPSTREAM_DELAY_MS} ms`,
        unit: 'chats/s',
        ours: meanRps(ours),
        baseline: { name: `ideal: ${CONNECTIONS} clients ÷ ${UPSTREAM_DELAY_MS / 1000} s`, value: IDEAL_RPS },
        target: { on: 'ratio', atLeast: TARGET_SHARE },
        notes:
          `the same load straight at the fake upstream: ${fmt(meanRps(results.direct!))}/s; ` +
          `counted as responses in the window ÷ its length: ours ${fmt(meanWindowRps(ours))}/s, the fake's ${fmt(meanWindowRps(results.direct!))}/s; ` +
          cpuNotes({ ours }),
        details: results,
      },
      {
        figure: 4,
        measure: 'the same, errors (connection errors, timeouts, non-2xx)',
        unit: 'errors',
        // The warm-up's too: the same load, its first seconds.
        ours: totalErrors(ours) + warmup.ours!.errors,
        target: { on: 'value', atMost: 0 },
        notes: `of which ${warmup.ours!.errors} in the ${WARMUP_SECONDS} s warm-up`,
      },
    ];
  },
};
