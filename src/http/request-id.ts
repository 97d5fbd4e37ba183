import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';

/** A request id a client may send: short, and nothing a log line or a header would need to escape. */
const REQUEST_ID = /^[\w.:-]{1,128}$/;

/**
 * A request's id: the `x-request-id` it was sent with when well formed (so that a trace spans services,
 * and a client's support can find its request in the log), else one made for it.
 */
export function requestIdOf(request: IncomingMessage): string {
  const incoming = request.headers['x-request-id'];
  return typeof incoming === 'string' && REQUEST_ID.test(incoming) ? incoming : randomUUID();
}
