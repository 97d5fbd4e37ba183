/**
 * Where a request target's query starts: at its first `?` or `#`, as Fastify's router (find-my-way)
 * reads it, which takes a raw `#` as the start of one too; -1 without one.
 */
export function queryStart(url: string): number {
  const [question, hash] = [url.indexOf('?'), url.indexOf('#')];
  return question === -1 || (hash !== -1 && hash < question) ? hash : question;
}

/** A request target's path: all of it before its query (see `queryStart`). */
export function pathOf(url: string): string {
  const start = queryStart(url);
  return start === -1 ? url : url.slice(0, start);
}
