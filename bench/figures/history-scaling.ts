import { alternate } from '../alternate.js';
import { chatOnce, UpstreamClient } from '../chat.js';
import { type Figure, fmt } from '../figure.js';
import { LARGE_HISTORY, SMALL_HISTORY } from '../seed.js';
import { addedAt } from '../stats.js';
import { ANSWER_AT_ONCE } from '../workload.js';

/** Enough that its p99 is not one or two chats' (150 made it the second slowest of each side). */
const ROUNDS = 500;
const WARMUP = 10;
const TARGET_RATIO = 1.2;

interface Sample {
  ours: number;
  direct: number;
  /** What the service sent upstream. */
  messages: number;
  bytes: number;
}

export const historyScaling: Figure = {
  number: 8,
  title: 'History scaling',
  async run(bench) {
    const { service, seed } = bench;
    if (seed.smallHistoryProjectIds.length < WARMUP + ROUNDS) throw new Error('too few seeded projects with a short history');
    await bench.fake.behave(ANSWER_AT_ONCE);
    const direct = new UpstreamClient(bench.fake.url);
    // A chat through the service, then the same upstream body sent directly. Each after a chat in the
    // same project, unmeasured, on both sides: a small history is a fresh project each time, which its
    // first chat would have met cold where the large one's, used every round, was warm.
    const pair = async (projectId: string): Promise<Sample> => {
      await chatOnce(service, projectId);
      const ours = await chatOnce(service, projectId);
      const body = await bench.fake.lastChat();
      return { ours, direct: await direct.complete(body), messages: (JSON.parse(body) as { messages: unknown[] }).messages.length, bytes: body.length };
    };
    // Each chat adds two messages: a fresh project each time keeps "10" at 10 (seeded with 8, and one chat
    // before); 100,000 stays 100,000 near enough.
    let small = 0;
    const samples = await alternate(
      ROUNDS,
      { small: () => pair(seed.smallHistoryProjectIds[small++]!), large: () => pair(seed.largeHistoryProjectId) },
      { warmupRounds: WARMUP },
    );
    direct.close();
    const added = (side: Sample[], p: number) =>
      addedAt(
        side.map((sample) => sample.ours),
        side.map((sample) => sample.direct),
        p,
      );
    const large = samples.large!;
    const smallSide = samples.small!;
    const sent = large.at(-1)!;

    const trips = {
      small: await bench.countRoundTrips(`POST chat, JSON, ${SMALL_HISTORY} stored messages`, (probe) => chatOnce(probe, seed.smallHistoryProjectIds.at(-1)!)),
      large: await bench.countRoundTrips(`POST chat, JSON, ${LARGE_HISTORY.toLocaleString('en')} stored messages`, (probe) =>
        chatOnce(probe, seed.largeHistoryProjectId),
      ),
    };
    const notes =
      `${ROUNDS} chats each, alternating, each beside a direct call with the same upstream body; ` +
      `the large history fills the default model's context: ${sent.messages} messages (${fmt(sent.bytes / 1024)} KB) sent upstream per chat` +
      (trips.large === undefined ? '' : `; ${trips.large} database round trips per chat vs ${trips.small}`);
    // Both percentiles judged: "latency" is both in figure 3, and the tail is where a large history costs.
    return [50, 99].map((p) => ({
      figure: 8,
      measure: `chat added latency p${p}, ${LARGE_HISTORY.toLocaleString('en')} stored messages`,
      unit: 'ms',
      ours: added(large, p),
      baseline: { name: `the same, ${SMALL_HISTORY} stored messages`, value: added(smallSide, p) },
      target: { on: 'ratio', atMost: TARGET_RATIO },
      notes,
      ...(p === 50 ? { details: samples } : {}),
    }));
  },
};
