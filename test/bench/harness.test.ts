import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { alternate } from '../../bench/alternate.js';
import { addedLatencyRow, failedRow, passes, ratioOf, type Row } from '../../bench/figure.js';
import { deltaGaps, firstDeltas, HttpClient, lateGaps, OPENAI_CHUNKS, OUR_EVENTS } from '../../bench/http-client.js';
import { runLoad } from '../../bench/load.js';
import { ownCpu } from '../../bench/proc.js';
import { describeMachine, writeReport } from '../../bench/report.js';
import { addedAt, percentile, round, summarize } from '../../bench/stats.js';
import { parseWrkOutput } from '../../bench/wrk.js';

// The benchmarks judge their own figures: what they count and how they judge is tested here, so that
// a pass in the README's table means what it says. Timings themselves are never asserted.

const row = (ours: number, baseline: number | undefined, target: Row['target']): Row => ({
  figure: 1,
  measure: 'm',
  unit: 'req/s',
  ours,
  ...(baseline === undefined ? {} : { baseline: { name: 'b', value: baseline } }),
  target,
});

describe('percentiles and summaries', () => {
  it('takes the nearest rank of an ascending array', () => {
    const hundred = Array.from({ length: 100 }, (_, i) => i + 1);
    expect(percentile(hundred, 50)).toBe(50);
    expect(percentile(hundred, 99)).toBe(99);
    expect(percentile(hundred, 100)).toBe(100);
    expect(percentile([7], 99)).toBe(7);
    expect(percentile([], 50)).toBeNaN();
  });

  it('summarizes samples in any order', () => {
    const summary = summarize([5, 1, 4, 2, 3]);
    expect(summary).toEqual({ n: 5, p50: 3, p90: 5, p99: 5, max: 5, mean: 3 });
  });

  it('rounds to three significant digits and at most two decimals', () => {
    expect(round(52286.4)).toBe(52286);
    expect(round(2.5349)).toBe(2.53);
    expect(round(0.06712)).toBe(0.07);
    expect(round(-0.0712)).toBe(-0.07);
  });
});

describe('judging a row', () => {
  it('holds a ratio to its bound, at the bound included', () => {
    const atLeast = { on: 'ratio', atLeast: 0.9 } as const;
    expect(passes(row(90, 100, atLeast))).toBe(true);
    expect(passes(row(89.9, 100, atLeast))).toBe(false);
    const atMost = { on: 'ratio', atMost: 2 } as const;
    expect(passes(row(2, 1, atMost))).toBe(true);
    expect(passes(row(2.01, 1, atMost))).toBe(false);
  });

  it('holds a value to its bound, whatever the baseline', () => {
    const target = { on: 'value', atMost: 2 } as const;
    expect(passes(row(1.99, 0.5, target))).toBe(true);
    expect(passes(row(2.01, 100, target))).toBe(false);
  });

  it('counts what cannot be judged as a miss, and a row without a target as reported', () => {
    expect(passes(row(1, undefined, { on: 'ratio', atLeast: 0.9 }))).toBe(false);
    expect(passes(row(1, 0, { on: 'ratio', atLeast: 0.9 }))).toBe(false);
    expect(ratioOf(row(1, 0, undefined))).toBeUndefined();
    expect(passes(row(1, 1, undefined))).toBeUndefined();
    const failed = failedRow({ number: 4, title: 'Chat throughput', run: async () => [] }, new Error('service exited'));
    expect(passes(failed)).toBe(false);
    expect(failed.notes).toContain('service exited');
  });

  it('reports added latency as the percentile of what each round added over the direct call in it', () => {
    // Round by round: 2, 3, 3, 4, 11 added. A tail of the direct call's (9) hides none of the service's.
    const ours = [3, 4, 5, 6, 20];
    const direct = [1, 1, 2, 2, 9];
    const added = addedLatencyRow({ figure: 3, measure: 'added', at: 'p50', added: addedAt(ours, direct, 50), direct: summarize(direct), directName: 'direct', atMostMs: 3 });
    expect(added.ours).toBe(3);
    expect(added.baseline).toEqual({ name: 'direct, p50', value: 2 });
    expect(passes(added)).toBe(true);
    const tail = addedLatencyRow({ figure: 3, measure: 'added', at: 'p99', added: addedAt(ours, direct, 99), direct: summarize(direct), directName: 'direct', atMostMs: 10 });
    expect(tail.ours).toBe(11);
    expect(passes(tail)).toBe(false);
    // A tail of the service's in a round whose direct call was slow too is still a tail: 6 ms over it.
    expect(addedAt([1, 1, 1, 1, 12], [0.5, 0.5, 0.5, 0.5, 6], 99)).toBe(6);
    expect(() => addedAt([1, 2], [1], 50)).toThrow(/unpaired/);
  });

  it('judges no ratio to a baseline of zero or less: an added latency within the noise is no yardstick', () => {
    expect(passes(row(5, -0.2, { on: 'ratio', atMost: 1.2 }))).toBe(false);
    expect(passes(row(3, -0.05, { on: 'ratio', atMost: 1.5 }))).toBe(false);
    expect(passes(row(2.4, 2, { on: 'ratio', atMost: 1.2 }))).toBe(true);
  });
});

describe('the report', () => {
  const dirs: string[] = [];
  afterEach(() => dirs.splice(0).forEach((dir) => rmSync(dir, { recursive: true, force: true })));

  it('writes a miss as a miss, in the table and in the JSON', () => {
    const dir = mkdtempSync(join(tmpdir(), 'bench-report-'));
    dirs.push(dir);
    const rows = [
      row(52_286, 78_232, { on: 'ratio', atLeast: 0.9 }),
      row(6_340, 4_906, { on: 'ratio', atLeast: 0.8 }),
      // Rounded, these would read as on their bounds: 0.1 against at most 0.1, 3 ms against at most 3.
      row(2.92, 28.5, { on: 'ratio', atMost: 0.1 }),
      row(3.0004, 0.4, { on: 'value', atMost: 3 }),
      row(2.5, 25, { on: 'ratio', atMost: 0.1 }),
    ];
    const report = {
      startedAt: 'start',
      finishedAt: 'end',
      revision: 'abc1234',
      machine: describeMachine(),
      database: 'postgres' as const,
      pinning: 'none',
      coldCalls: [
        { hotUs: 10, afterSleepUs: 40, afterSpinUs: 55 },
        { hotUs: 20, afterSleepUs: 30, afterSpinUs: 20 },
      ],
      rows,
      background: [
        { figure: 1, othersCpu: 0.02, loadAverage: 1.5, checkpointBuffers: 0 },
        { figure: 8, othersCpu: 0.03, loadAverage: 1.1, checkpointBuffers: 3872 },
        { figure: 9, othersCpu: -0.02, loadAverage: 1.2, checkpointBuffers: 0 },
      ],
      roundTrips: [],
    };
    writeReport(report, join(dir, 'results.json'), join(dir, 'results.md'));
    const table = readFileSync(join(dir, 'results.md'), 'utf8').split('\n');
    expect(table.find((line) => line.startsWith('| 1 | m (req/s) | 52286 |'))).toContain('| 0.67 | ratio ≥ 0.9 | **MISS** |');
    expect(table.find((line) => line.startsWith('| 1 | m (req/s) | 6340 |'))).toContain('| 1.29 | ratio ≥ 0.8 | **pass** |');
    expect(table.find((line) => line.startsWith('| 1 | m (req/s) | 2.92 |'))).toContain('| 0.102 | ratio ≤ 0.1 | **MISS** |');
    expect(table.find((line) => line.startsWith('| 1 | m (req/s) | 3.0004 |'))).toContain('| — | ≤ 3 req/s | **MISS** |');
    expect(table.find((line) => line.startsWith('| 1 | m (req/s) | 2.5 |'))).toContain('| 0.1 | ratio ≤ 0.1 | **pass** |');
    expect(table.find((line) => line.startsWith('- Cold code (`bench/cold-probe.ts`, where the measured server runs;'))).toContain(
      '10 µs hot, 40 µs (4×) after 100 ms asleep, 55 µs (5.5×) after 100 ms of other work; then 20 µs hot, 30 µs (1.5×) after 100 ms asleep, 20 µs (1×) after 100 ms of other work.',
    );
    expect(table.find((line) => line.startsWith('Other processes'))).toBe(
      "Other processes on the machine (not the bench) while each figure ran, CPU as a share of one core, and the load average; and what PostgreSQL's checkpoints wrote meanwhile: 1: 2%, 1.5, 0 buffers (0 MB); 8: 3%, 1.1, 3872 buffers (30.3 MB); 9: 0%, 1.2, 0 buffers (0 MB).",
    );
    // Without the checkpoints' count (the embedded database), the line says nothing of them.
    writeReport({ ...report, database: 'pglite', background: [{ figure: 1, othersCpu: 0.02, loadAverage: 1.5 }] }, join(dir, 'results.json'), join(dir, 'results.md'));
    expect(readFileSync(join(dir, 'results.md'), 'utf8').split('\n').find((line) => line.startsWith('Other processes'))).toBe(
      'Other processes on the machine (not the bench) while each figure ran, CPU as a share of one core, and the load average: 1: 2%, 1.5.',
    );
    const json = JSON.parse(readFileSync(join(dir, 'results.json'), 'utf8')) as { rows: { pass: boolean }[] };
    expect(json.rows.map((judged) => judged.pass)).toEqual([false, true, false, false, true]);
  });
});

describe('alternating sides', () => {
  it('rotates which side goes first each round and drops the warm-up rounds', async () => {
    const order: string[] = [];
    let round = 0;
    const results = await alternate(
      3,
      { a: async () => (order.push('a'), round), b: async () => (order.push('b'), round) },
      { warmupRounds: 1, beforeRound: async () => round++ },
    );
    expect(order.join('')).toBe('abbaabba');
    expect(results).toEqual({ a: [2, 3, 4], b: [2, 3, 4] });
  });
});

/** Listens on a free loopback port; its URL. */
async function urlOf(listening: Server): Promise<string> {
  listening.listen(0, '127.0.0.1');
  await once(listening, 'listening');
  return `http://127.0.0.1:${(listening.address() as { port: number }).port}`;
}

describe('timing a stream', () => {
  let server: Server | undefined;
  afterEach(async () => {
    server?.closeAllConnections();
    server?.close();
  });

  /** Serves one stream: each entry is written on its own, `pauseMs` after the one before. */
  async function serve(writes: string[], pauseMs: number): Promise<string> {
    server = createServer(async (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      for (const write of writes) {
        res.write(write);
        await sleep(pauseMs);
      }
      res.end();
    });
    return urlOf(server);
  }

  it('counts our deltas and done, when an event is split across writes', async () => {
    const origin = await serve(
      ['id: 1\nevent: user_message\ndata: {}\n\n', 'id: 2\nevent: delta\nda', 'ta: {"content":"a"}\n\nid: 3\nevent: delta\ndata: {"content":"b"}\n\n', 'event: done\ndata: {}\n\n'],
      20,
    );
    const client = new HttpClient(origin);
    const timing = await client.stream('/', '{}', OUR_EVENTS);
    client.close();
    expect(timing).toMatchObject({ status: 200, done: true });
    expect(timing.error).toBeUndefined();
    expect(timing.deltaMs).toHaveLength(2);
    // The first event came a write before the first delta: the delta is timed when it is whole.
    expect(timing.deltaMs[0]!).toBeGreaterThan(timing.firstEventMs);
    expect(firstDeltas([timing])).toEqual([timing.deltaMs[0]]);
    // Both deltas completed in one write: one gap, of nothing.
    expect(deltaGaps([timing])).toEqual([0]);
  });

  it('counts OpenAI chunks with content as deltas, and [DONE] as the end', async () => {
    const chunk = (content: string) => `data: ${JSON.stringify({ choices: [{ delta: { content } }] })}\n\n`;
    const origin = await serve([chunk(''), chunk('a'), chunk('b'), 'data: [DONE]\n\n'], 5);
    const client = new HttpClient(origin);
    const timing = await client.stream('/', '{}', OPENAI_CHUNKS);
    client.close();
    expect(timing.deltaMs).toHaveLength(2);
    expect(timing.done).toBe(true);
    expect(deltaGaps([timing])[0]).toBeGreaterThan(0);
  });

  it('tells how many gaps are late, in how many streams and at how many positions', () => {
    const stream = (deltaMs: number[]) => ({ status: 200, startedAt: 0, firstEventMs: 0, deltaMs, endMs: deltaMs.at(-1)!, done: true });
    // Gaps 5, 9, 5 / 9, 5, 5 / 5, 5, 12: three over 6 ms, one in each stream, each at a position of its own.
    const timings = [stream([1, 6, 15, 20]), stream([1, 10, 15, 20]), stream([1, 6, 11, 23])];
    expect(lateGaps(timings, 6)).toEqual({ gaps: 3, streams: 3, positions: 3 });
    expect(lateGaps(timings.slice(0, 2), 6)).toEqual({ gaps: 2, streams: 2, positions: 2 });
    // Two late at one position, and two in one stream.
    expect(lateGaps([...timings, stream([1, 10, 15, 20])], 6)).toEqual({ gaps: 4, streams: 4, positions: 3 });
    expect(lateGaps([stream([1, 10, 19, 24])], 6)).toEqual({ gaps: 2, streams: 1, positions: 2 });
    expect(lateGaps(timings, 9)).toEqual({ gaps: 1, streams: 1, positions: 1 });
    expect(lateGaps(timings, 12)).toEqual({ gaps: 0, streams: 0, positions: 0 });
  });

  it('says a stream failed when the status is not 200', async () => {
    server = createServer((_req, res) => res.writeHead(503).end());
    const client = new HttpClient(await urlOf(server));
    const timing = await client.stream('/', '{}', OUR_EVENTS);
    client.close();
    expect(timing).toMatchObject({ status: 503, error: 'status 503', done: false });
  });
});

describe('closed-loop throughput', () => {
  let server: Server | undefined;
  afterEach(async () => {
    server?.closeAllConnections();
    server?.close();
  });

  it('counts each connection up to its last answer, not the request still in flight when the window closes', async () => {
    // Every answer takes 400 ms at least: a connection makes at most 2.5 requests a second.
    const ANSWER_MS = 400;
    server = createServer((_req, res) => void sleep(ANSWER_MS).then(() => res.end('{}')));
    const url = await urlOf(server);
    const load = await runLoad({}, { url, connections: 3, durationSeconds: 1 });
    expect(load.errors).toBe(0);
    // Counted over the window, each connection's third answer (at 1.2 s at the earliest) is left out.
    expect(load.windowRps).toBeLessThanOrEqual(3 * 2);
    expect(load.rps).toBeGreaterThan(load.windowRps);
    expect(load.rps).toBeLessThanOrEqual((3 * 1000) / ANSWER_MS);
  });

  it('counts a connection whose request stalls at its rate over the whole window, not its rate before the stall', async () => {
    // Every answer after 100 ms, but the third request never: one of the two connections stalls.
    let requests = 0;
    server = createServer((_req, res) => {
      if (++requests !== 3) void sleep(100).then(() => res.end('{}'));
    });
    const url = await urlOf(server);
    const load = await runLoad({}, { url, connections: 2, durationSeconds: 1 });
    // Counted up to its last answer alone, the stalled connection would count as much as the other.
    expect(load.rps).toBeLessThan(1.5 * load.windowRps);
  });

  const hasWrk = (() => {
    try {
      execFileSync('wrk', ['--version'], { stdio: 'ignore' });
      return true;
    } catch (error) {
      // wrk prints its usage and exits 1 when asked its version: there, but not for this.
      return (error as NodeJS.ErrnoException).code !== 'ENOENT';
    }
  })();

  it.skipIf(!hasWrk)('from wrk: counts the answers in the window, and what was not a success as errors', async () => {
    // Every answer after 100 ms, every third a 503: 2 connections make at most 20 requests a second.
    let requests = 0;
    server = createServer((_req, res) => void sleep(100).then(() => res.writeHead(++requests % 3 === 0 ? 503 : 200).end('{}')));
    const url = await urlOf(server);
    const load = await runLoad({}, { url, connections: 2, durationSeconds: 1, generator: 'wrk' });
    expect(load.errors).toBeGreaterThanOrEqual(Math.floor(requests / 3) - 2);
    expect(load.rps).toBeGreaterThan(0);
    expect(load.rps).toBeLessThanOrEqual((2 / 3) * 20 + 1);
    expect(load.p50Ms).toBeGreaterThanOrEqual(100);
    await expect(runLoad({}, { url, connections: 1, durationSeconds: 1, generator: 'wrk', method: 'POST', body: '{}' })).rejects.toThrow(/GETs/);
  });
});

describe('the harness own CPU', () => {
  it('counts a child of its own once the child has ended, as wrk is', () => {
    const before = ownCpu();
    // The child works until it has used 0.3 s of CPU, however long that takes, and says how much it used.
    const child = `const cpu = () => { const { user, system } = process.cpuUsage(); return (user + system) / 1e6; };
      while (cpu() < 0.3); process.stdout.write(String(cpu()));`;
    const childCpu = Number(execFileSync(process.execPath, ['-e', child], { encoding: 'utf8' }));
    // Less what the child used before its last tick was counted (/proc counts in hundredths of a second).
    expect(ownCpu() - before).toBeGreaterThanOrEqual(childCpu - 0.02);
  });
});

describe("wrk's report", () => {
  // What wrk 4.1 printed for a server answering every tenth request 503 (`wrk -t1 -c5 -d1s --latency`).
  const REPORT = `Running 1s test @ http://127.0.0.1:4199/
  1 threads and 5 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   491.60us    1.36ms  16.29ms   95.86%
    Req/Sec    20.38k     7.83k   25.69k    80.00%
  Latency Distribution
     50%  193.00us
     75%  298.00us
     90%  627.00us
     99%    8.19ms
  20212 requests in 1.00s, 2.79MB read
  Non-2xx or 3xx responses: 2021
Requests/sec:  20193.62
Transfer/sec:      2.79MB
`;

  it('counts only the successful answers in the rate, the others as errors, and reads the percentiles in ms', () => {
    const result = parseWrkOutput(REPORT);
    expect(result.rps).toBeCloseTo((20193.62 * (20212 - 2021)) / 20212, 6);
    expect(result.errors).toBe(2021);
    expect(result.p50Ms).toBeCloseTo(0.193, 9);
    expect(result.p99Ms).toBeCloseTo(8.19, 9);
  });

  it('adds socket errors, timeouts among them, to the errors', () => {
    const withSockets = REPORT.replace('  Non-2xx', '  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx');
    expect(parseWrkOutput(withSockets).errors).toBe(2021 + 10);
    const allAnswered = REPORT.replace(/^ {2}Non-2xx.*\n/m, '');
    expect(parseWrkOutput(allAnswered)).toMatchObject({ rps: 20193.62, errors: 0 });
  });

  it('refuses a report it cannot read rather than count it as nothing', () => {
    expect(() => parseWrkOutput('unable to connect to 127.0.0.1:1 Connection refused')).toThrow(/no request count/);
    expect(() => parseWrkOutput(REPORT.replace(/^ +99%.*\n/m, ''))).toThrow(/99% latency/);
  });
});
