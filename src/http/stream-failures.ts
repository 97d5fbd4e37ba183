import type { FastifyReply } from 'fastify';
import type { Problem } from './errors.js';

/**
 * Streams whose turn failed after their 200 headers went out: the failure went to the client as the
 * stream's last `error` event, and the request's metrics and last log line tell it by that event's
 * status and code, as gRPC tells a stream by the status in its trailers. Counted as 200 (what the
 * headers said), a failed stream was in no error rate.
 */
const failedStreams = new WeakMap<FastifyReply, Pick<Problem, 'status' | 'code'>>();

export function markStreamFailed(reply: FastifyReply, { status, code }: Problem): void {
  failedStreams.set(reply, { status, code });
}

/** What a stream's `error` event said, when it ended with one. */
export const streamFailure = (reply: FastifyReply) => failedStreams.get(reply);
