/**
 * Aborts `target` when any of `sources` aborts, with that source's reason (one already aborted, the
 * first in order, at once); returns what stops following them. Unlike `AbortSignal.any`, nothing
 * combined is created, and once released no source holds a listener that keeps `target` (and whatever
 * listens to it) in memory.
 */
export function followAbort(target: AbortController, ...sources: AbortSignal[]): () => void {
  const listeners = sources.map((source) => [source, () => target.abort(source.reason)] as const);
  for (const [source, abort] of listeners) {
    if (source.aborted) abort();
    else source.addEventListener('abort', abort, { once: true });
  }
  return () => {
    for (const [source, abort] of listeners) source.removeEventListener('abort', abort);
  };
}
