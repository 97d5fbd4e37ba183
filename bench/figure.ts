import type { Bench } from './environment.js';
import { round, type Summary } from './stats.js';

/** A target: a bound on our figure itself, or on its ratio to the baseline. */
export interface Target {
  on: 'value' | 'ratio';
  atMost?: number;
  atLeast?: number;
}

/** One line of the results table. */
export interface Row {
  figure: number;
  measure: string;
  unit: string;
  ours: number;
  /** What ours is compared with, measured in the same run (or an ideal); absent for a bare count. */
  baseline?: { name: string; value: number };
  /** Absent: reported only. */
  target?: Target;
  /** What a reader needs to judge the number: conditions, what limits it. */
  notes?: string;
  /** Raw measurements, for results.json. */
  details?: unknown;
}

export interface Figure {
  number: number;
  title: string;
  run(bench: Bench): Promise<Row[]>;
}

export function ratioOf(row: Row): number | undefined {
  return row.baseline && row.baseline.value !== 0 ? row.ours / row.baseline.value : undefined;
}

/** True or false against the target; undefined when there is none, or no ratio to judge. */
export function passes(row: Row): boolean | undefined {
  const { target } = row;
  if (!target) return undefined;
  // A ratio to a baseline of zero or less (an added latency within the noise, or below it) says nothing:
  // a negative ratio was under every "at most", a pass whatever ours was.
  if (target.on === 'ratio' && !(row.baseline && row.baseline.value > 0)) return false;
  const value = target.on === 'ratio' ? ratioOf(row) : row.ours;
  if (value === undefined || !Number.isFinite(value)) return false;
  return (target.atMost === undefined || value <= target.atMost) && (target.atLeast === undefined || value >= target.atLeast);
}

export function describeTarget(row: Row): string {
  const { target } = row;
  if (!target) return 'reported';
  const subject = target.on === 'ratio' ? 'ratio' : '';
  const unit = target.on === 'value' ? ` ${row.unit}` : '';
  const bounds = [
    target.atLeast !== undefined ? `≥ ${target.atLeast}${unit}` : undefined,
    target.atMost !== undefined ? `≤ ${target.atMost}${unit}` : undefined,
  ].filter(Boolean);
  return `${subject} ${bounds.join(' and ')}`.trim();
}

export interface AddedLatency {
  figure: number;
  measure: string;
  at: 'p50' | 'p99';
  /** The time added at `at` (see `addedAt`), and the direct call's own: the baseline. */
  added: number;
  direct: Summary;
  directName: string;
  atMostMs: number;
  notes?: string;
  details?: unknown;
}

/** The time the service adds at one percentile. */
export function addedLatencyRow({ figure, measure, at, added, direct, directName, atMostMs, notes, details }: AddedLatency): Row {
  return {
    figure,
    measure: `${measure} ${at}`,
    unit: 'ms',
    ours: added,
    baseline: { name: `${directName}, ${at}`, value: direct[at] },
    target: { on: 'value', atMost: atMostMs },
    notes,
    details,
  };
}

/** A figure that failed to run is a miss, shown with its error, and the run goes on. */
export function failedRow(figure: Figure, error: unknown): Row {
  return {
    figure: figure.number,
    measure: figure.title,
    unit: '',
    ours: Number.NaN,
    target: { on: 'value', atMost: Number.NaN },
    notes: `did not complete: ${(error as Error).message ?? String(error)}`.slice(0, 500),
  };
}

export const fmt = (value: number): string => (Number.isFinite(value) ? String(round(value)) : '—');

/**
 * A judged value (a ratio, or a value held to a bound) as the report shows it: rounded as `fmt` does,
 * unless rounding would put it on a bound it is not on (0.1025 against "at most 0.1" read 0.1, a miss),
 * then with as many more digits as tell the two apart.
 */
export function fmtJudged(value: number, target: Target | undefined): string {
  const bounds = [target?.atMost, target?.atLeast].filter((bound) => bound !== undefined && bound !== value);
  let shown = fmt(value);
  for (let digits = 3; digits <= 8 && bounds.includes(Number(shown)); digits++) shown = String(Number(value.toPrecision(digits)));
  return shown;
}
