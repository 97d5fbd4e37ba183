/**
 * Where a request target's query starts: at its first `?` or `#`, as Fastify's router (find-my-way)
 * reads it, which takes a raw `#` as the start of one too; -1 without one.
 */
export function queryStart(url: string): number {
  const [question, hash] = [url.indexOf('?'), url.indexOf('#')];
  return question === -1 || (hash !== -1 && hash < question) ? hash : question;
}
