import { spawn } from 'node:child_process';
import { once } from 'node:events';

/** What one wrk run measured (all of it closed-loop, one thread, keep-alive connections). */
export interface WrkResult {
  /** 2xx and 3xx responses per second over the run. */
  rps: number;
  /** Connection errors (timeouts among them) and responses of status 400 and above. */
  errors: number;
  p50Ms: number;
  p99Ms: number;
}

/**
 * GET `url` from `connections` keep-alive connections for `seconds`, from wrk: a load generator in C
 * that takes a fraction of the CPU per request that one in JavaScript does. Figure 1's servers answer
 * in tens of microseconds, and autocannon, on the one core the harness has, was the limit: 96% busy
 * where `node:http` on the other core was 66%, so every server measured about the same.
 *
 * Its rate is its count of answers ÷ the run's length, which leaves out the request each connection
 * has in flight at the end: at most `connections` of the 100,000s a run of such a server counts.
 */
export async function runWrk(options: { url: string; connections: number; durationSeconds: number; headers?: Record<string, string> }): Promise<WrkResult> {
  const headers = Object.entries(options.headers ?? {}).flatMap(([name, value]) => ['-H', `${name}: ${value}`]);
  const args = ['-t1', `-c${options.connections}`, `-d${options.durationSeconds}s`, '--latency', '--timeout', '10s', ...headers, options.url];
  const child = spawn('wrk', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (output += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => (output += chunk));
  const [code] = (await Promise.race([
    once(child, 'exit'),
    once(child, 'error').then(([error]) => {
      const missing = (error as NodeJS.ErrnoException).code === 'ENOENT';
      throw missing ? new Error('wrk is not installed: `apt-get install wrk` (Debian, Ubuntu) or `brew install wrk`') : (error as Error);
    }),
  ])) as [number | null];
  if (code !== 0) throw new Error(`wrk exited with ${code}: ${output.trim()}`);
  return parseWrkOutput(output);
}

/** Reads wrk's report (`--latency`): its rate, its errors and the latency percentiles. */
export function parseWrkOutput(output: string): WrkResult {
  const number = (pattern: RegExp, what: string) => {
    const match = pattern.exec(output);
    if (!match) throw new Error(`no ${what} in wrk's output: ${output.trim()}`);
    return match.slice(1);
  };
  const [requests] = number(/^\s*(\d+) requests in /m, 'request count');
  const [perSecond] = number(/^Requests\/sec:\s+([\d.]+)/m, 'rate');
  const statusErrors = Number(/^\s*Non-2xx or 3xx responses: (\d+)/m.exec(output)?.[1] ?? 0);
  const socketErrors = /^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/m.exec(output);
  const latencyMs = (percent: number) => {
    const [value, unit] = number(new RegExp(`^\\s*${percent}%\\s+([\\d.]+)(us|ms|s)\\s*$`, 'm'), `${percent}% latency`);
    return Number(value) * { us: 0.001, ms: 1, s: 1000 }[unit as 'us' | 'ms' | 's'];
  };
  const count = Number(requests);
  return {
    rps: count === 0 ? 0 : (Number(perSecond) * (count - statusErrors)) / count,
    errors: statusErrors + (socketErrors ? socketErrors.slice(1).reduce((sum, n) => sum + Number(n), 0) : 0),
    p50Ms: latencyMs(50),
    p99Ms: latencyMs(99),
  };
}
