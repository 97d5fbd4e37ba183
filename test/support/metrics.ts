/** Reading Prometheus text as `GET /metrics` answers it. */

/** The value of the series `name` whose labels include `labels`; 0 when there is none yet. */
export function seriesValue(text: string, name: string, labels: Record<string, string> = {}): number {
  for (const line of text.split('\n')) {
    const series = /^(\w+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!series || series[1] !== name) continue;
    const has = Object.fromEntries([...(series[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((label) => [label[1], label[2]]));
    if (Object.entries(labels).every(([key, value]) => has[key] === value)) return Number(series[3]);
  }
  return 0;
}
