import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import type { ColdCalls } from './cold-probe.js';
import type { Bench } from './environment.js';
import { describeTarget, fmt, fmtJudged, passes, ratioOf, type Row } from './figure.js';
import { percent } from './stats.js';

export interface Machine {
  cpus: number;
  cpuModel: string;
  memoryGiB: number;
  kernel: string;
  node: string;
  postgres?: string;
}

export function describeMachine(postgresVersion?: string): Machine {
  const model = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? 'unknown';
  return {
    // Not availableParallelism(): this process is pinned to one CPU by then.
    cpus: cpus().length,
    cpuModel: model.trim(),
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    node: process.version,
    ...(postgresVersion ? { postgres: postgresVersion } : {}),
  };
}

export interface Report {
  startedAt: string;
  finishedAt: string;
  /** The commit measured, and whether the working tree differed from it. */
  revision: string;
  machine: Machine;
  database: Bench['database'];
  pinning: string;
  /** Measured before the figures and after them (bench/cold-probe.ts). */
  coldCalls: ColdCalls[];
  rows: Row[];
  background: Background[];
  roundTrips: Bench['roundTrips'];
}

/** Other work on the machine while a figure ran (tests of other people, say), and PostgreSQL's checkpoints. */
export interface Background {
  figure: number;
  /** CPU that processes other than the bench's used, as a share of one core (the machine has `cpus`). */
  othersCpu: number;
  /** The 1-minute load average at the figure's end. */
  loadAverage: number;
  /**
   * The buffers (8 KB pages) PostgreSQL's checkpoints wrote while it ran; absent on the embedded
   * database, or when they could not be read.
   */
  checkpointBuffers?: number;
}

export function currentRevision(): string {
  try {
    const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim();
    // The harness's own files count as the service's do (a figure changed is a different measure); the
    // results it writes do not.
    const changed = ['status', '--porcelain', '--untracked-files=no', '--', 'src', 'bench', ':!bench/results.md'];
    const dirty = execFileSync('git', changed, { encoding: 'utf8' }).trim() !== '';
    return dirty ? `${commit} with uncommitted changes in src/ or bench/` : commit;
  } catch {
    return 'unknown';
  }
}

export function writeReport(report: Report, jsonPath: string, markdownPath: string): void {
  const rows = report.rows.map((row) => ({ ...row, ratio: ratioOf(row), targetText: describeTarget(row), pass: passes(row) }));
  writeFileSync(jsonPath, JSON.stringify({ ...report, rows }, null, 2) + '\n');
  writeFileSync(markdownPath, markdown(report));
}

function markdown(report: Report): string {
  const { machine } = report;
  const lines = [
    `- Run: ${report.startedAt} – ${report.finishedAt}, revision ${report.revision}.`,
    `- Machine: ${machine.cpus} × ${machine.cpuModel}, ${machine.memoryGiB} GiB, Linux ${machine.kernel}, Node.js ${machine.node}` +
      (machine.postgres ? `, ${machine.postgres}` : '') +
      `; database: ${report.database === 'postgres' ? 'PostgreSQL (DATABASE_URL)' : 'embedded PGlite'}.`,
    `- CPUs: ${report.pinning}.`,
    `- Cold code (\`bench/cold-probe.ts\`, where the measured server runs; before the figures, then after): ${report.coldCalls.map(describeColdCalls).join('; then ') || 'not measured'}.`,
    '',
    '| # | measure | ours | baseline | ratio | target | result | notes |',
    '|---|---|---|---|---|---|---|---|',
    ...report.rows.map(tableRow),
    '',
    'Other processes on the machine (not the bench) while each figure ran, CPU as a share of one core, and the load average' +
      (report.background.some((figure) => figure.checkpointBuffers !== undefined) ? "; and what PostgreSQL's checkpoints wrote meanwhile: " : ': ') +
      report.background.map(describeBackground).join('; ') +
      '.',
    '',
  ];
  if (report.roundTrips.length) {
    lines.push('Database round trips, recorded on the wire:', '');
    for (const { what, trips } of report.roundTrips) {
      lines.push(`- ${what}: **${trips.length}**`);
      // The same statement again and again (history pages) is one line with its count.
      for (let i = 0; i < trips.length; ) {
        let repeats = 1;
        while (trips[i + repeats]?.sql === trips[i]!.sql) repeats++;
        const sql = trips[i]!.sql;
        lines.push(`  - \`${sql.length > 160 ? `${sql.slice(0, 157)}...` : sql}\`${repeats > 1 ? ` × ${repeats}` : ''}`);
        i += repeats;
      }
    }
    lines.push('');
  }
  return lines.join('\n');
}

function describeBackground({ figure, othersCpu, loadAverage, checkpointBuffers }: Background): string {
  const checkpoints = checkpointBuffers === undefined ? '' : `, ${checkpointBuffers} buffers (${fmt((checkpointBuffers * 8) / 1024)} MB)`;
  // The machine's counter and the bench's are read apart and in clock ticks: a few percent below zero
  // (as the short-lived servers of figure 1 end) is their noise, and means nothing else ran.
  return `${figure}: ${percent(Math.max(0, othersCpu))}, ${loadAverage.toFixed(1)}${checkpoints}`;
}

function describeColdCalls({ hotUs, afterSleepUs, afterSpinUs }: ColdCalls): string {
  const times = (us: number) => `${fmt(us)} µs (${fmt(us / hotUs)}×)`;
  return `${fmt(hotUs)} µs hot, ${times(afterSleepUs)} after 100 ms asleep, ${times(afterSpinUs)} after 100 ms of other work`;
}

function tableRow(row: Row): string {
  const pass = passes(row);
  const ratio = ratioOf(row);
  const cells = [
    String(row.figure),
    `${row.measure} (${row.unit})`,
    row.target?.on === 'value' ? fmtJudged(row.ours, row.target) : fmt(row.ours),
    row.baseline ? `${fmt(row.baseline.value)} (${row.baseline.name})` : '—',
    ratio === undefined || row.target?.on === 'value' ? '—' : fmtJudged(ratio, row.target),
    describeTarget(row),
    pass === undefined ? 'reported' : pass ? '**pass**' : '**MISS**',
    row.notes ?? '',
  ];
  return `| ${cells.map((cell) => cell.replaceAll('|', '\\|')).join(' | ')} |`;
}
