import { readdirSync, readFileSync } from 'node:fs';

/** Linux's USER_HZ: /proc reports CPU time in hundredths of a second. */
const TICKS_PER_SECOND = 100;

/** The numeric fields of a process's /proc stat line after its command name (utime is at 11). */
function statFields(pid: number | 'self'): number[] {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name is in parentheses and may itself hold spaces.
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
}

/** CPU time (user + system) a process and all its threads have used so far, in seconds. */
export function cpuSeconds(pid: number): number {
  const [utime, stime] = statFields(pid).slice(11, 13) as [number, number];
  return (utime + stime) / TICKS_PER_SECOND;
}

/** Resident memory of a process, in bytes (VmRSS). */
export function rssBytes(pid: number): number {
  const match = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!match) throw new Error(`no VmRSS for process ${pid}`);
  return Number(match[1]) * 1024;
}

/** CPU time every process on the machine has used so far (user, nice, system, interrupts, steal). */
export const machineCpu: CpuMeter = () => {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = fields as [number, number, number, number, number, number, number, number];
  return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND;
};

/** CPU seconds used so far by something: a process, a group of them, this one. */
export type CpuMeter = () => number;

export const processCpu = (pid: number): CpuMeter => () => cpuSeconds(pid);

/**
 * CPU time this process has used so far, and its children that have ended and been reaped: wrk, run
 * for a window of load, counts as the harness's own once it has exited, as autocannon in this process
 * does. (A server that ends is reaped too, but only when the bench stops, or when it fails.)
 */
export const ownCpu: CpuMeter = () => {
  const [utime, stime, cutime, cstime] = statFields('self').slice(11, 15) as [number, number, number, number];
  return (utime + stime + cutime + cstime) / TICKS_PER_SECOND;
};

/**
 * The PostgreSQL backends serving `database` (their title names it), wherever they run. Backends come
 * and go with the pools: each reading adds what every live one used since the last, so that one that
 * has ended takes nothing back (what it used after the last reading is lost).
 */
export function postgresBackendsCpu(database: string): CpuMeter {
  const seen = new Map<number, number>();
  let total = 0;
  return () => {
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const title = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
        if (!title.startsWith('postgres: ') || !title.includes(` ${database} `)) continue;
        const pid = Number(entry);
        const used = cpuSeconds(pid);
        total += used - (seen.get(pid) ?? 0);
        seen.set(pid, used);
      } catch {
        // ended meanwhile
      }
    }
    return total;
  };
}

/** The CPU each meter's subject used while `work` ran, as a share of one core. */
export async function cpuShares<T>(meters: Record<string, CpuMeter>, work: () => Promise<T>): Promise<{ result: T; shares: Record<string, number> }> {
  const before = Object.entries(meters).map(([name, meter]) => [name, meter()] as const);
  const started = process.hrtime.bigint();
  const result = await work();
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  return { result, shares: Object.fromEntries(before.map(([name, used]) => [name, (meters[name]!() - used) / seconds])) };
}
