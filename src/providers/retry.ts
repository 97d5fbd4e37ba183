const INITIAL_BACKOFF_MS = 250;
const MAX_BACKOFF_MS = 8_000;

/**
 * The wait before retry number `retry` (0 for the first) when the upstream did not say: exponential,
 * with "equal jitter" (half fixed, half random) so that clients failed together do not retry together.
 */
export function backoffMs(retry: number): number {
  const ceiling = Math.min(INITIAL_BACKOFF_MS * 2 ** retry, MAX_BACKOFF_MS);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/**
 * The wait an upstream asked for: `retry-after-ms` (OpenAI's, finer), else `Retry-After` in seconds
 * or as an HTTP date (RFC 9110 §10.2.3). Undefined when neither is present and valid.
 */
export function retryAfterMs(headers: Record<string, string | string[] | undefined>): number | undefined {
  const millis = Number.parseFloat(single(headers['retry-after-ms']) ?? '');
  if (millis >= 0) return millis;
  const value = single(headers['retry-after'])?.trim();
  if (!value) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return seconds >= 0 ? seconds * 1000 : undefined;
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

/** A header given once; one given more than once is not to be trusted with a wait. */
function single(value: string | string[] | undefined): string | undefined {
  return typeof value === 'string' ? value : undefined;
}
