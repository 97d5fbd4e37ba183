import { alternate } from '../alternate.js';
import { chatBody, chatOnce, chatPath, clearHistory, expectWhole, streamOnce, UPSTREAM_PATH, UpstreamClient, upstreamBodyOf } from '../chat.js';
import type { Bench } from '../environment.js';
import { type Figure, fmt } from '../figure.js';
import { firstDeltas } from '../http-client.js';
import { compareThroughput, cpuNotes, meanRps } from '../load.js';
import { addedAt, percentileOf, summarize } from '../stats.js';
import { ANSWER_AT_ONCE } from '../workload.js';

const JSON_ITERATIONS = 1000;
const STREAM_ITERATIONS = 150;
const CONNECTIONS = 50;
const TARGET_P50_RATIO = 1.5;
const TARGET_FIRST_DELTA_RATIO = 0.1;
const TARGET_THROUGHPUT_RATIO = 1;

const PEER = '@portkey-ai/gateway 1.15';

/** How the gateway is told where to go: OpenAI's protocol, at the fake upstream, with a key. */
function gatewayHeaders(bench: Bench): Record<string, string> {
  return {
    'x-portkey-provider': 'openai',
    'x-portkey-custom-host': `${bench.fake.url}/v1`,
    authorization: 'Bearer sk-bench',
  };
}

export const peer: Figure = {
  number: 9,
  title: 'Peer gateway',
  async run(bench) {
    const gateway = await bench.gateway();
    const { service } = bench;
    const project = bench.seed.chatProjectId;
    const clear = () => clearHistory(service, project);
    await bench.fake.behave(ANSWER_AT_ONCE);

    // Sequential JSON chats: ours, the gateway's and the direct call, rotating.
    await clear();
    const jsonBody = await upstreamBodyOf(bench, () => chatOnce(service, project));
    const direct = new UpstreamClient(bench.fake.url);
    const viaGateway = new UpstreamClient(gateway.url, gatewayHeaders(bench));
    const json = await alternate(
      JSON_ITERATIONS,
      { ours: () => chatOnce(service, project), gateway: () => viaGateway.complete(jsonBody), direct: () => direct.complete(jsonBody) },
      { warmupRounds: 100, beforeRound: clear },
    );

    // Streamed chats: time to the first delta.
    await clear();
    const streamBody = await upstreamBodyOf(bench, () => streamOnce(service, project));
    const deltas = ANSWER_AT_ONCE.chunks;
    const streams = await alternate(
      STREAM_ITERATIONS,
      {
        ours: async () => expectWhole(await streamOnce(service, project), deltas, 'stream through the service'),
        gateway: async () => expectWhole(await viaGateway.stream(streamBody), deltas, 'stream through the gateway'),
        direct: async () => expectWhole(await direct.stream(streamBody), deltas, 'direct stream'),
      },
      { warmupRounds: 15, beforeRound: clear },
    );
    direct.close();
    viaGateway.close();
    const first = { ours: firstDeltas(streams.ours!), gateway: firstDeltas(streams.gateway!), direct: firstDeltas(streams.direct!) };

    // Throughput, the upstream answering at once. Ours spreads its chats over many projects, so that
    // each history stays a few messages long; the gateway sends the same one-message body every time.
    const contentType = { 'content-type': 'application/json' };
    const { rounds: load } = await compareThroughput(
      {
        ours: {
          pid: service.pid,
          load: {
            url: service.url,
            connections: CONNECTIONS,
            method: 'POST',
            headers: { ...contentType, authorization: service.authorization },
            body: chatBody(false),
            nextPath: () => chatPath(bench.nextPoolProject()),
          },
        },
        gateway: {
          pid: gateway.pid,
          load: {
            url: `${gateway.url}${UPSTREAM_PATH}`,
            connections: CONNECTIONS,
            method: 'POST',
            headers: { ...contentType, ...gatewayHeaders(bench) },
            body: jsonBody,
          },
        },
      },
      { rounds: 3, seconds: 5, warmupSeconds: 2, meters: bench.databaseCpu },
    );

    const sequential = summarize(json.direct!);
    return [
      {
        figure: 9,
        measure: 'peer: chat added latency p50 (JSON)',
        unit: 'ms',
        ours: addedAt(json.ours!, json.direct!, 50),
        baseline: { name: PEER, value: addedAt(json.gateway!, json.direct!, 50) },
        target: { on: 'ratio', atMost: TARGET_P50_RATIO },
        notes: `${JSON_ITERATIONS} sequential chats each way, rotating; the direct call p50 ${fmt(sequential.p50)} ms; we store both messages, it stores nothing`,
        details: { ours: summarize(json.ours!), gateway: summarize(json.gateway!), direct: sequential },
      },
      {
        figure: 9,
        measure: 'peer: chat added latency p99 (JSON)',
        unit: 'ms',
        ours: addedAt(json.ours!, json.direct!, 99),
        baseline: { name: PEER, value: addedAt(json.gateway!, json.direct!, 99) },
      },
      {
        figure: 9,
        measure: 'peer: added time to first delta p50 (streaming)',
        unit: 'ms',
        ours: addedAt(first.ours, first.direct, 50),
        baseline: { name: PEER, value: addedAt(first.gateway, first.direct, 50) },
        target: { on: 'ratio', atMost: TARGET_FIRST_DELTA_RATIO },
        notes: `${STREAM_ITERATIONS} sequential streams each way, rotating; the direct stream's first delta p50 ${fmt(percentileOf(first.direct, 50))} ms`,
        details: { ours: summarize(first.ours), gateway: summarize(first.gateway), direct: summarize(first.direct) },
      },
      {
        figure: 9,
        measure: `peer: chats/s, ${CONNECTIONS} connections, upstream answering at once`,
        unit: 'req/s',
        ours: meanRps(load.ours!),
        baseline: { name: PEER, value: meanRps(load.gateway!) },
        target: { on: 'ratio', atLeast: TARGET_THROUGHPUT_RATIO },
        notes: cpuNotes(load),
        details: load,
      },
    ];
  },
};
