/** Percentile by nearest rank of an ascending array (p in 0–100). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1]!;
}

/** Percentile of samples in any order. */
export const percentileOf = (samples: readonly number[], p: number) => percentile([...samples].sort((a, b) => a - b), p);

/**
 * The time a side adds over the direct call at percentile `p`, of the differences round by round (each
 * `side[i]` and `direct[i]` measured in one round, on the same upstream body): the added latency of each
 * chat. Not the difference of the two percentiles, which hid a tail of the side's behind an unrelated
 * one of the direct call's (p99 6 ms over it read 2 ms) and made one out of two unrelated tails.
 */
export function addedAt(side: readonly number[], direct: readonly number[], p: number): number {
  if (side.length !== direct.length) throw new Error(`unpaired samples: ${side.length} against ${direct.length}`);
  return percentileOf(
    side.map((value, i) => value - direct[i]!),
    p,
  );
}

export interface Summary {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

export function summarize(samples: readonly number[]): Summary {
  const sorted = [...samples].sort((a, b) => a - b);
  const mean = sorted.reduce((sum, value) => sum + value, 0) / (sorted.length || 1);
  return {
    n: sorted.length,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted.at(-1) ?? Number.NaN,
    mean,
  };
}

export function mean(values: readonly number[]): number {
  return values.reduce((sum, value) => sum + value, 0) / values.length;
}

/** A share of one core (or anything else) as a whole percentage. */
export const percent = (share: number) => `${Math.round(share * 100)}%`;

/** Rounds for the report: 3 significant digits, at most 2 decimals. */
export function round(value: number): number {
  if (!Number.isFinite(value)) return value;
  const digits = Math.max(0, Math.min(2, 2 - Math.floor(Math.log10(Math.abs(value) || 1))));
  return Number(value.toFixed(digits));
}
