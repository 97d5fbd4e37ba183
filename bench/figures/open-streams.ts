import { setTimeout as sleep } from 'node:timers/promises';
import { chatBody, chatPath } from '../chat.js';
import { type Figure, fmt } from '../figure.js';
import { deltaGaps, HttpClient, OUR_EVENTS, type StreamTiming } from '../http-client.js';
import { cpuShares, ownCpu, processCpu, rssBytes } from '../proc.js';
import { percent, summarize } from '../stats.js';
import type { UpstreamBehaviour } from '../workload.js';

const STREAMS = 5000;
/**
 * New chats arrive at 250/s, below figure 4's 400 chats/s, so that this figure measures holding streams
 * open rather than taking them in: all are open after 20 s.
 */
const BATCH = 25;
const BATCH_EVERY_MS = 100;
/** A slow drip that outlasts the arrivals: a delta every 500 ms for 40 s. */
const DRIP: UpstreamBehaviour = { delayMs: 0, chunks: 80, chunkGapMs: 500 };
/** A pause a second longer than the upstream's is a stall. */
const STALL_MS = DRIP.chunkGapMs + 1000;
const RSS_SAMPLE_MS = 250;
/** Before the measure, on the service just started: its stream path compiled, its connections open. */
const WARMUP_STREAMS = 250;
const WARMUP_DRIP: UpstreamBehaviour = { delayMs: 0, chunks: 5, chunkGapMs: 10 };
const TARGET_RSS_PER_STREAM_KB = 64;

interface RssSample {
  at: number;
  bytes: number;
}

export const openStreams: Figure = {
  number: 6,
  title: 'Open streams',
  async run(bench) {
    // A service of its own: the RSS it starts from is the same whichever figures ran before (their
    // garbage had filled the heap that the streams then grew into: 37 KB a stream after figures 1–5,
    // 76 KB in a run of figure 6 alone).
    await bench.restartService();
    const { service } = bench;
    const client = new HttpClient(service.url, { authorization: service.authorization }, { keepAlive: false, maxSockets: Infinity });
    await bench.fake.behave(WARMUP_DRIP);
    await Promise.all(Array.from({ length: WARMUP_STREAMS }, () => client.stream(chatPath(bench.nextPoolProject()), chatBody(true), OUR_EVENTS)));
    await bench.fake.behave(DRIP);
    const rssBefore = rssBytes(service.pid);
    const meters = { service: processCpu(service.pid), ...bench.databaseCpu, 'fake upstream': processCpu(bench.fake.pid), harness: ownCpu };

    const samples: RssSample[] = [];
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        samples.push({ at: performance.now(), bytes: rssBytes(service.pid) });
        await sleep(RSS_SAMPLE_MS);
      }
    })();
    const { result: timings, shares } = await cpuShares(meters, async () => {
      const streams: Promise<StreamTiming>[] = [];
      for (let opened = 0; opened < STREAMS; opened += BATCH) {
        for (let i = 0; i < BATCH; i++) streams.push(client.stream(chatPath(bench.nextPoolProject()), chatBody(true), OUR_EVENTS));
        await sleep(BATCH_EVERY_MS);
      }
      return Promise.all(streams);
    });
    sampling = false;
    await sampler;
    client.close();

    // Open from the first event to the end of the response; the peak is found at the RSS samples.
    const openAt = (at: number) =>
      timings.filter((timing) => timing.startedAt + timing.firstEventMs <= at && at < timing.startedAt + timing.endMs).length;
    // The most streams open, and of the samples with that many, the largest RSS: the first such sample
    // came as the last stream opened, before the process had grown for all of them.
    const counted = samples.map((sample) => ({ ...sample, open: openAt(sample.at) }));
    const peak = counted.reduce((best, sample) => (sample.open > best.open || (sample.open === best.open && sample.bytes > best.bytes) ? sample : best));
    const firstAtPeak = counted.find((sample) => sample.open === peak.open)!;
    const opening = summarize(timings.map((timing) => timing.firstEventMs).filter(Number.isFinite));
    const failed = timings.filter((timing) => timing.error || !timing.done);
    const lost = timings.reduce((sum, timing) => sum + DRIP.chunks - timing.deltaMs.length, 0);
    const stalls = deltaGaps(timings).filter((gap) => gap > STALL_MS).length;
    const perStreamKb = (peak.bytes - rssBefore) / peak.open / 1024;
    const errors = [...new Set(failed.map((timing) => timing.error ?? 'ended without done'))].slice(0, 3);
    const busy = `CPU, share of one core: ${Object.entries(shares).map(([name, share]) => `${name} ${percent(share)}`).join(', ')}`;
    return [
      {
        figure: 6,
        measure: 'SSE chats open at once in one process',
        unit: 'streams',
        ours: peak.open,
        baseline: { name: 'streams started', value: STREAMS },
        target: { on: 'value', atLeast: STREAMS },
        notes:
          `upstream: ${DRIP.chunks} deltas ${DRIP.chunkGapMs} ms apart; ${(BATCH * 1000) / BATCH_EVERY_MS} chats started per second; ` +
          `each open (its first event) p50 ${fmt(opening.p50)} / max ${fmt(opening.max)} ms after its request; ${busy}`,
        details: { cpu: shares, samples },
      },
      {
        figure: 6,
        measure: `lost deltas + stalls (a pause over ${STALL_MS} ms)`,
        unit: 'count',
        ours: lost + stalls,
        target: { on: 'value', atMost: 0 },
        notes: `${lost} deltas lost, ${stalls} stalls, ${failed.length} streams failed${errors.length ? ` (${errors.join('; ')})` : ''}`,
      },
      {
        figure: 6,
        measure: 'RSS per open stream',
        unit: 'KB',
        ours: perStreamKb,
        target: { on: 'value', atMost: TARGET_RSS_PER_STREAM_KB },
        notes:
          `a service started for this figure, after ${WARMUP_STREAMS} short streams: RSS ${fmt(rssBefore / 2 ** 20)} MB before, at most ${fmt(peak.bytes / 2 ** 20)} MB with ${peak.open} open ` +
          `(${fmt(firstAtPeak.bytes / 2 ** 20)} MB as the last of them opened: ${fmt((firstAtPeak.bytes - rssBefore) / peak.open / 1024)} KB a stream)`,
      },
    ];
  },
};
