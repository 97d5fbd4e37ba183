import { readdirSync, readFileSync } from 'node:fs';

/** Linux's USER_HZ: /proc reports CPU time in hundredths of a second. */
const TICKS_PER_SECOND = 100;

/** CPU time (user + system) a process and all its threads have used so far, in seconds. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name, which is in parentheses and may itself hold spaces.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND;
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

export const ownCpu: CpuMeter = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1e6;
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
