import { alternate } from '../alternate.js';
import { clearHistory, expectWhole, streamOnce, UpstreamClient, upstreamBodyOf } from '../chat.js';
import { addedLatencyRow, type Figure, fmt } from '../figure.js';
import { deltaGaps, firstDeltas, lateGaps } from '../http-client.js';
import { addedAt, summarize } from '../stats.js';
import type { UpstreamBehaviour } from '../workload.js';

const ITERATIONS = 150;
const WARMUP = 15;
/** A short answer dripping at a steady pace: 20 deltas, 5 ms apart. */
const DRIP: UpstreamBehaviour = { delayMs: 0, chunks: 20, chunkGapMs: 5 };
const TARGET_FIRST_DELTA_MS = 2;
const TARGET_GAP_P99_MS = 1;

export const streaming: Figure = {
  number: 5,
  title: 'Streaming',
  async run(bench) {
    const { service } = bench;
    const project = bench.seed.chatProjectId;
    await bench.fake.behave(DRIP);
    const clear = () => clearHistory(service, project);
    await clear();
    const body = await upstreamBodyOf(bench, () => streamOnce(service, project));
    const direct = new UpstreamClient(bench.fake.url);
    const timings = await alternate(
      ITERATIONS,
      {
        ours: async () => expectWhole(await streamOnce(service, project), DRIP.chunks, 'stream through the service'),
        direct: async () => expectWhole(await direct.stream(body), DRIP.chunks, 'direct stream'),
      },
      { warmupRounds: WARMUP, beforeRound: clear },
    );
    direct.close();
    const firsts = { ours: firstDeltas(timings.ours!), direct: firstDeltas(timings.direct!) };
    const first = { ours: summarize(firsts.ours), direct: summarize(firsts.direct) };
    const gaps = { ours: summarize(deltaGaps(timings.ours!)), direct: summarize(deltaGaps(timings.direct!)) };
    const directName = 'direct stream from the fake upstream';
    // Which gaps are later than the target lets through, and where: one step of every stream, or anywhere.
    const lateOverMs = gaps.direct.p99 + TARGET_GAP_P99_MS;
    const late = { ours: lateGaps(timings.ours!, lateOverMs), direct: lateGaps(timings.direct!, lateOverMs) };
    return [
      addedLatencyRow({
        figure: 5,
        measure: 'streaming added time to first delta',
        at: 'p50',
        added: addedAt(firsts.ours, firsts.direct, 50),
        direct: first.direct,
        directName,
        atMostMs: TARGET_FIRST_DELTA_MS,
        notes:
          `${ITERATIONS} sequential streams each way, alternating; upstream: ${DRIP.chunks} deltas ${DRIP.chunkGapMs} ms apart; ` +
          `first delta through the service p50 ${fmt(first.ours.p50)} / p99 ${fmt(first.ours.p99)} ms`,
        details: { first, gaps },
      }),
      addedLatencyRow({
        figure: 5,
        measure: 'streaming added inter-delta gap',
        at: 'p99',
        // Gaps pair with no gap of the other side: the difference of the two p99s.
        added: gaps.ours.p99 - gaps.direct.p99,
        direct: gaps.direct,
        directName,
        atMostMs: TARGET_GAP_P99_MS,
        notes:
          `gaps through the service p50 ${fmt(gaps.ours.p50)} / p99 ${fmt(gaps.ours.p99)} ms; ` +
          `over ${fmt(lateOverMs)} ms (the direct p99 and the target): ${late.ours.gaps} of ${gaps.ours.n} through the service, ` +
          `in ${late.ours.streams} streams at ${late.ours.positions} of ${DRIP.chunks - 1} positions; ${late.direct.gaps} direct, in ${late.direct.streams} streams`,
      }),
    ];
  },
};
