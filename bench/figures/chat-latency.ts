import { alternate } from '../alternate.js';
import { chatOnce, clearHistory, streamOnce, UpstreamClient, upstreamBodyOf } from '../chat.js';
import { addedLatencyRow, type Figure, fmt } from '../figure.js';
import { addedAt, summarize } from '../stats.js';
import { ANSWER_AT_ONCE } from '../workload.js';

const ITERATIONS = 1500;
const WARMUP = 100;
const TARGET_P50_MS = 3;
const TARGET_P99_MS = 8;

export const chatLatency: Figure = {
  number: 3,
  title: 'Chat added latency (JSON)',
  async run(bench) {
    const { service } = bench;
    const project = bench.seed.chatProjectId;
    await bench.fake.behave(ANSWER_AT_ONCE);
    // Both sides then send the upstream one user message: no history.
    const clear = () => clearHistory(service, project);
    await clear();
    const body = await upstreamBodyOf(bench, () => chatOnce(service, project));
    const direct = new UpstreamClient(bench.fake.url);
    const samples = await alternate(
      ITERATIONS,
      { ours: () => chatOnce(service, project), direct: () => direct.complete(body) },
      { warmupRounds: WARMUP, beforeRound: clear },
    );
    direct.close();
    const ours = summarize(samples.ours!);
    const upstream = summarize(samples.direct!);

    const trips = await bench.countRoundTrips(
      'POST /api/v1/projects/:projectId/chat, JSON, empty history',
      (probe) => chatOnce(probe, project),
      (probe) => clearHistory(probe, project),
    );
    await bench.countRoundTrips(
      'POST /api/v1/projects/:projectId/chat, streaming, empty history',
      (probe) => streamOnce(probe, project),
      (probe) => clearHistory(probe, project),
    );
    const conditions =
      `${ITERATIONS} sequential chats, each beside a direct call with the same upstream body, alternating; ` +
      `through the service p50 ${fmt(ours.p50)} / p99 ${fmt(ours.p99)} ms` +
      (trips === undefined ? '' : `; ${trips} database round trips per turn`);
    const row = { figure: 3, measure: 'chat added latency (JSON)', direct: upstream, directName: 'direct call to the fake upstream' };
    const added = (p: number) => addedAt(samples.ours!, samples.direct!, p);
    return [
      addedLatencyRow({ ...row, at: 'p50', added: added(50), atMostMs: TARGET_P50_MS, notes: conditions, details: { ours, direct: upstream } }),
      addedLatencyRow({ ...row, at: 'p99', added: added(99), atMostMs: TARGET_P99_MS }),
    ];
  },
};
