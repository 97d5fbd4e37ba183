import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { percentileOf } from './stats.js';

/**
 * How much slower this machine runs code that has not run for a while. Figure 5's streams are
 * sequential, each after a direct stream of about 100 ms, so every turn runs the service's whole path
 * after 100 ms without it; figures 1–4 keep it running. A fixed piece of a turn's kind of work (parse,
 * serialize and hash a chat request's JSON) is timed three ways, in a process on the measured server's
 * CPU: right after itself (hot), after 100 ms asleep, and after 100 ms of other work in a tight loop
 * that touches almost no memory. When the last is slow too, code goes cold here not because the CPU
 * idles (a sleep state, the hypervisor parking the virtual CPU) but because something other than the
 * process (the kernel, the hypervisor, a neighbour on the same physical core) takes its caches meanwhile.
 */
export interface ColdCalls {
  /** Medians of the same work, in µs. */
  hotUs: number;
  afterSleepUs: number;
  afterSpinUs: number;
}

const PAUSE_MS = 100;
const SAMPLES = 25;

const REQUEST = JSON.stringify({
  model: 'gpt-4o-mini',
  messages: Array.from({ length: 12 }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: `message ${i} `.repeat(20) })),
  stream: true,
});

function work(): string {
  const request = JSON.parse(REQUEST) as { messages: { content: string }[] };
  request.messages.push({ content: 'one more question' });
  return createHash('sha256').update(JSON.stringify(request)).digest('hex');
}

function timedUs(): number {
  const start = process.hrtime.bigint();
  work();
  return Number(process.hrtime.bigint() - start) / 1000;
}

/** Busy for `ms` on arithmetic alone: no system call, no memory to speak of. */
function spin(ms: number): number {
  const end = performance.now() + ms;
  let x = 0;
  while (performance.now() < end) for (let i = 0; i < 10_000; i++) x = (x * 31 + i) | 0;
  return x;
}

async function measure(): Promise<ColdCalls> {
  for (let i = 0; i < 2_000; i++) work();
  const hot: number[] = [];
  const afterSleep: number[] = [];
  const afterSpin: number[] = [];
  for (let i = 0; i < SAMPLES; i++) {
    await sleep(PAUSE_MS);
    afterSleep.push(timedUs());
    hot.push(timedUs());
    spin(PAUSE_MS);
    afterSpin.push(timedUs());
  }
  const median = (samples: number[]) => percentileOf(samples, 50);
  return { hotUs: median(hot), afterSleepUs: median(afterSleep), afterSpinUs: median(afterSpin) };
}

/** Measures in a process of its own on `cpus` (taskset's list), or wherever the scheduler puts it. */
export function measureColdCalls(cpus: string | undefined): ColdCalls {
  const node = [process.execPath, '--import', 'tsx', fileURLToPath(import.meta.url)];
  const [command, ...args] = cpus ? ['taskset', '-c', cpus, ...node] : node;
  // About 5 s of work: a child that takes a minute is stuck.
  return JSON.parse(execFileSync(command!, args, { encoding: 'utf8', timeout: 60_000 })) as ColdCalls;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) process.stdout.write(JSON.stringify(await measure()));
