import { setTimeout as sleep } from 'node:timers/promises';
import { alternate } from '../alternate.js';
import type { Bench } from '../environment.js';
import { type Figure, fmt } from '../figure.js';
import { HttpClient, type TimedResponse } from '../http-client.js';
import { percentileOf, summarize } from '../stats.js';

const LOGINS_PER_SECOND = 10;
const WINDOW_MS = 8000;
/** The probe: one GET /health/live every 5 ms, one at a time. */
const PROBE_EVERY_MS = 5;
const ROUNDS = 2;
const TARGET_RATIO = 2;

interface Window {
  probes: number[];
  /** Logins started in the window and answered 200: their times in ms (including the ones that ended after it). */
  logins: number[];
  /** Logins the service shed: 503 with Retry-After, its hashing queue full (the demand is more than a core). */
  shed: number;
}

export const loginIsolation: Figure = {
  number: 7,
  title: 'Login isolation',
  async run(bench) {
    const probe = new HttpClient(bench.service.url);
    const logins = new HttpClient(bench.service.url, {}, { keepAlive: true, maxSockets: Infinity });
    await probeFor(probe, 1000); // warm-up
    const windows = await alternate(ROUNDS, {
      idle: async (): Promise<Window> => ({ probes: await probeFor(probe, WINDOW_MS), logins: [], shed: 0 }),
      loggingIn: () => whileLoggingIn(bench, logins, () => probeFor(probe, WINDOW_MS)),
    });
    probe.close();
    logins.close();
    const idle = summarize(windows.idle!.flatMap((window) => window.probes));
    const loaded = summarize(windows.loggingIn!.flatMap((window) => window.probes));
    const loginTimes = windows.loggingIn!.flatMap((window) => window.logins);
    const shed = windows.loggingIn!.reduce((sum, window) => sum + window.shed, 0);
    return [
      {
        figure: 7,
        measure: `GET /health/live p99 while logins run at ${LOGINS_PER_SECOND}/s (bcrypt cost 12)`,
        unit: 'ms',
        ours: loaded.p99,
        baseline: { name: 'the same, idle', value: idle.p99 },
        target: { on: 'ratio', atMost: TARGET_RATIO },
        notes:
          `a probe every ${PROBE_EVERY_MS} ms, ${ROUNDS} windows of ${WINDOW_MS / 1000} s each way, alternating; ` +
          `p50 ${fmt(loaded.p50)} ms vs ${fmt(idle.p50)} ms idle; ${loginTimes.length} logins answered, ` +
          `each p50 ${fmt(percentileOf(loginTimes, 50))} / max ${fmt(Math.max(...loginTimes))} ms; ${shed} shed (503, Retry-After)`,
        details: { idle, loaded, logins: summarize(loginTimes), shed },
      },
    ];
  },
};

/** GET /health/live at a steady pace for `ms`; each one's time. A slow answer delays the next probe, never doubles it. */
async function probeFor(client: HttpClient, ms: number): Promise<number[]> {
  const times: number[] = [];
  const end = performance.now() + ms;
  while (performance.now() < end) {
    const next = performance.now() + PROBE_EVERY_MS;
    const response = await client.request('GET', '/health/live');
    if (response.status !== 200) throw new Error(`GET /health/live: ${response.status}`);
    times.push(response.ms);
    await sleep(Math.max(0, next - performance.now()));
  }
  return times;
}

/**
 * Starts logins at a fixed rate (whether or not the earlier ones have finished, as users would) while
 * `probe` runs, then waits for every one of them, so that none spills into the next window.
 */
async function whileLoggingIn(bench: Bench, client: HttpClient, probe: () => Promise<number[]>): Promise<Window> {
  const body = JSON.stringify({ email: bench.seed.email, password: bench.seed.password });
  const pending: Promise<TimedResponse | Error>[] = [];
  const timer = setInterval(() => {
    // Settled here, so that a failure waits for the end of the window instead of crashing the run.
    pending.push(client.request('POST', '/api/v1/auth/login', body).catch((error: Error) => error));
  }, 1000 / LOGINS_PER_SECOND);
  let probes: number[];
  try {
    probes = await probe();
  } finally {
    clearInterval(timer);
  }
  const logins = await Promise.all(pending);
  const shed = (login: TimedResponse | Error) => !(login instanceof Error) && login.status === 503 && login.headers['retry-after'] !== undefined;
  const failed = logins.find((login) => login instanceof Error || (login.status !== 200 && !shed(login)));
  if (failed) throw new Error(`login: ${failed instanceof Error ? failed.message : `${failed.status} ${failed.body.slice(0, 200)}`}`);
  const answered = (logins as TimedResponse[]).filter((login) => login.status === 200);
  return { probes, logins: answered.map((login) => login.ms), shed: logins.length - answered.length };
}
