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
 * The most an upstream's wait is taken to be: an hour, as long as a chat's whole deadline may be
 * (AI_TIMEOUT_MS), so that it never decides a wait the deadline would not. More is a broken or hostile
 * upstream (`Retry-After: 99999999999`, `retry-after-ms: 1e300`, `Infinity`), and it was passed on to
 * our clients as their Retry-After, and slept by calls without a deadline: Node cuts a timer past 2^31 ms
 * to 1 ms, which retried at once. A limit that does last longer is seen again an hour later.
 */
export const MAX_RETRY_AFTER_MS = 3_600_000;

/**
 * The wait an upstream asked for, at most MAX_RETRY_AFTER_MS: `retry-after-ms` (OpenAI's, finer), else
 * `Retry-After` in seconds or as an HTTP date (RFC 9110 §10.2.3). Undefined when neither is present and valid.
 */
export function retryAfterMs(headers: Record<string, string | string[] | undefined>): number | undefined {
  const wait = askedMs(headers);
  return wait === undefined ? undefined : Math.min(wait, MAX_RETRY_AFTER_MS);
}

function askedMs(headers: Record<string, string | string[] | undefined>): number | undefined {
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
