import type { IncomingHttpHeaders } from 'node:http';

/*
 * A download's validator and range (RFC 9110 §8.8.3, §13, §14): a client that has a file's bytes asks
 * whether they changed (they never do), and one whose download broke asks for the rest.
 */

/** Bytes `start` to `end` of a file, both included. */
export interface ByteRange {
  start: number;
  end: number;
}

/** A stored file's entity tag: its bytes never change, and their SHA-256 names them. */
export function entityTag(sha256: string): string {
  return `"${sha256}"`;
}

/**
 * Whether the request's If-None-Match names `tag` (compared weakly, as §13.1.2 says) or is `*`: the
 * client has these bytes.
 */
export function clientHas(headers: IncomingHttpHeaders, tag: string): boolean {
  return names(headers['if-none-match'], (candidate) => (candidate.startsWith('W/') ? candidate.slice(2) : candidate) === tag);
}

/**
 * Whether the request's If-Match, when it has one, names `tag` (compared strongly, §13.1.1) or is `*`:
 * the client asks for these bytes and no others.
 */
export function matchesIfMatch(headers: IncomingHttpHeaders, tag: string): boolean {
  const ifMatch = headers['if-match'];
  return ifMatch === undefined || names(ifMatch, (candidate) => candidate === tag);
}

/** Whether a list of entity tags is `*` or holds one that `is` accepts. */
function names(list: string | undefined, is: (tag: string) => boolean): boolean {
  return list !== undefined && list.split(',').some((candidate) => candidate.trim() === '*' || is(candidate.trim()));
}

/**
 * One range of bytes, in any of its three forms: `first-last`, `first-` and `-suffix` (the last bytes),
 * beside empty list elements (`bytes=0-1,`), which a recipient must take (RFC 9110 §5.6.1).
 */
const ONE_RANGE = /^bytes=[ \t,]*(\d*)-(\d*)[ \t,]*$/i;

/**
 * The range of a file of `size` bytes that the request's Range asks for; 'unsatisfiable' when it starts
 * past the end; undefined for none, and for a request the whole file answers, as §14.2 lets a server
 * do: a Range it does not read (several ranges, another unit, a malformed one), an If-Range that names
 * other bytes than these (`tag`, compared strongly; a date never matches, as no Last-Modified is sent),
 * and the last bytes of an empty file (§14.1.2: satisfiable, and all of it is nothing).
 */
export function requestedRange(headers: IncomingHttpHeaders, tag: string, size: number): ByteRange | 'unsatisfiable' | undefined {
  const { range, 'if-range': ifRange } = headers;
  // Node joins a header sent twice, but types this one as possibly a list: such a one names no tag.
  if (range === undefined || (ifRange !== undefined && String(ifRange).trim() !== tag)) return undefined;
  const [, first, last] = ONE_RANGE.exec(range) ?? [];
  if (first === undefined || last === undefined || (first === '' && last === '')) return undefined;
  if (first === '') {
    const suffix = Number(last);
    if (suffix === 0) return 'unsatisfiable';
    return size === 0 ? undefined : { start: Math.max(size - suffix, 0), end: size - 1 };
  }
  const start = Number(first);
  if (last !== '' && Number(last) < start) return undefined;
  if (start >= size) return 'unsatisfiable';
  return { start, end: last === '' ? size - 1 : Math.min(Number(last), size - 1) };
}
