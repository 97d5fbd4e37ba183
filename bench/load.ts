import autocannon from 'autocannon';
import { alternate } from './alternate.js';
import { type CpuMeter, cpuShares, ownCpu, processCpu } from './proc.js';
import { mean, percent } from './stats.js';
import { runWrk } from './wrk.js';

export interface LoadOptions {
  url: string;
  connections: number;
  durationSeconds: number;
  method?: 'GET' | 'POST';
  headers?: Record<string, string>;
  body?: string;
  /** A path per request (e.g. chats spread over many projects); the URL's path otherwise. */
  nextPath?: () => string;
  /**
   * autocannon (the default) or, for GETs of one URL from servers too fast for it, wrk (`bench/wrk.ts`),
   * which counts over the window: its `rps` is its `windowRps`.
   */
  generator?: 'autocannon' | 'wrk';
}

export interface LoadResult {
  /** Successful (2xx) responses per second: each connection's rate, summed (see `runLoad`). */
  rps: number;
  /** 2xx responses in the window ÷ its length: what autocannon and wrk report (see `runLoad`). */
  windowRps: number;
  /** Connection errors (timeouts among them) and non-2xx responses. */
  errors: number;
  p50Ms: number;
  p99Ms: number;
  /** Share of one core each meter's subject used (the server under test, the database, the load generator). */
  cpu: Record<string, number>;
}

/**
 * Closed-loop load, and the CPU each meter's subject used meanwhile. From autocannon in this process
 * unless `generator` says wrk (which runs as a child of this process: see `ownCpu`).
 */
export async function runLoad(meters: Record<string, CpuMeter>, options: LoadOptions): Promise<LoadResult> {
  const { result, shares } = await cpuShares(meters, () => (options.generator === 'wrk' ? wrkLoad(options) : autocannonLoad(options)));
  return { ...result, cpu: shares };
}

async function wrkLoad(options: LoadOptions): Promise<Omit<LoadResult, 'cpu'>> {
  if ((options.method ?? 'GET') !== 'GET' || options.body !== undefined || options.nextPath) throw new Error('wrk sends GETs of one URL here');
  const result = await runWrk(options);
  return { ...result, windowRps: result.rps };
}

/**
 * Autocannon's load. The rate is each connection's 2xx responses over the time to its last response,
 * summed over the connections. Autocannon's own (responses in the
 * window ÷ its length) leaves out the request each connection still has in flight when the window
 * closes: a loss of up to one request per connection, in steps of one, so that with figure 4's 200
 * clients, 500 ms a chat and 10 s it can only say 380, 360 or 340/s (380 for anything from 500 to
 * 526 ms a chat). A request in flight for longer than its connection took for one on average is
 * stalled, not cut off: that connection's time then runs to the window's end, less one such request.
 */
async function autocannonLoad(options: LoadOptions): Promise<Omit<LoadResult, 'cpu'>> {
  const { nextPath } = options;
  const connections = new Map<object, { ok: number; lastMs: number }>();
  const startedAt = performance.now();
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon(
      {
        url: options.url,
        connections: options.connections,
        duration: options.durationSeconds,
        method: options.method ?? 'GET',
        headers: options.headers,
        body: options.body,
        ...(nextPath ? { requests: [{ setupRequest: (request) => ({ ...request, path: nextPath() }) }] } : {}),
      },
      (error: unknown, done) => (error ? reject(error as Error) : resolve(done)),
    );
    instance.on('response', (client, statusCode) => {
      let connection = connections.get(client);
      if (!connection) connections.set(client, (connection = { ok: 0, lastMs: 0 }));
      if (statusCode >= 200 && statusCode < 300) connection.ok++;
      connection.lastMs = performance.now() - startedAt;
    });
  });
  const windowMs = performance.now() - startedAt;
  let rps = 0;
  for (const { ok, lastMs } of connections.values()) {
    if (ok > 0) rps += (1000 * ok) / Math.max(lastMs, windowMs - lastMs / ok);
  }
  return {
    rps,
    windowRps: result['2xx'] / result.duration,
    errors: result.errors + result.non2xx,
    p50Ms: result.latency.p50,
    p99Ms: result.latency.p99,
  };
}

export interface LoadSide {
  pid: number;
  load: Omit<LoadOptions, 'durationSeconds'>;
}

export interface ThroughputRounds {
  rounds: number;
  seconds: number;
  warmupSeconds: number;
  /** Whatever else works for the server, e.g. the database's backends. */
  meters?: Record<string, CpuMeter>;
}

/** What `compareThroughput` measured: each side's rounds, and its warm-up (whose errors are errors too). */
export interface Throughput {
  rounds: Record<string, LoadResult[]>;
  warmup: Record<string, LoadResult>;
}

/** Each side under the same load in turn, `rounds` times, after a short warm-up of each. */
export async function compareThroughput(sides: Record<string, LoadSide>, options: ThroughputRounds): Promise<Throughput> {
  const metersOf = (side: LoadSide) => ({ server: processCpu(side.pid), ...options.meters, 'load generator': ownCpu });
  const warmup: Record<string, LoadResult> = {};
  for (const [name, side] of Object.entries(sides)) warmup[name] = await runLoad(metersOf(side), { ...side.load, durationSeconds: options.warmupSeconds });
  const runs = Object.fromEntries(
    Object.entries(sides).map(([name, side]) => [name, () => runLoad(metersOf(side), { ...side.load, durationSeconds: options.seconds })]),
  );
  return { rounds: await alternate(options.rounds, runs), warmup };
}

export const meanRps = (results: LoadResult[]) => mean(results.map((result) => result.rps));
export const meanWindowRps = (results: LoadResult[]) => mean(results.map((result) => result.windowRps));
export const totalErrors = (results: LoadResult[]) => results.reduce((sum, result) => sum + result.errors, 0);

/**
 * Who was busy: a server at 100% of its core is the limit; a load generator or a database near it may
 * be. The server's CPU per request tells what a whole core would serve, whatever else ran meanwhile.
 */
export function cpuNotes(sides: Record<string, LoadResult[]>): string {
  const side = ([name, results]: [string, LoadResult[]]) => {
    const share = (meter: string) => mean(results.map((result) => result.cpu[meter]!));
    const perRequestMs = (1000 * share('server')) / meanRps(results);
    const meters = Object.keys(results[0]!.cpu).map((meter) => `${meter} ${percent(share(meter))}`);
    return `${name}: ${meters.join(', ')} (server ${perRequestMs.toPrecision(2)} ms CPU per request)`;
  };
  return `CPU, share of one core: ${Object.entries(sides).map(side).join('; ')}`;
}
