import type { FastifyReply, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { BODY_LIMIT_BYTES } from '../../http/body-limits.js';
import { ApiError, clientGoneSignal, logFailure, toProblem } from '../../http/errors.js';
import { problem, schemaReference } from '../../http/openapi.js';
import { markStreamFailed } from '../../http/stream-failures.js';
import { projectParams } from '../projects/schemas.js';
import { type IdempotencyStore, requestHash } from './idempotency.js';
import { chatBody, chatHeaders, type ChatResult, chatResult, streamEvents } from './schemas.js';
import { InFlightTurns } from './in-flight-turns.js';
import type { ChatService, KeepResult, PreparedTurn } from './service.js';
import { EventStream } from './sse.js';

/** Comment heartbeats keep proxies and clients from closing an idle stream. */
const HEARTBEAT_MS = 15_000;
/** On shutdown, turns in flight are interrupted this long before the bound: time to store and say so. */
const INTERRUPT_BEFORE_BOUND_MS = 2_000;

const sseResponse = z.string().meta({
  description:
    'text/event-stream: `user_message` {userMessage}, then `delta` {content} events, then `done` ' +
    '{assistantMessage, usage}; or `error` with problem details. Each event has an id; `: ping` comments keep it open. ' +
    'The data of each event, by its name: `x-events` (OpenAPI 3.0 has no way of its own to say it).',
  'x-events': {
    ...Object.fromEntries(Object.entries(streamEvents).map(([event, schema]) => [event, schemaReference(schema)])),
    error: schemaReference(problem),
  },
});

/** A turn's refusals that depend on the project's settings at the time, not on the request or its caller. */
const REFUSED_AS_SET_NOW = new Set(['CONTEXT_TOO_LONG', 'PROVIDER_NOT_CONFIGURED']);

export interface ChatRoutesOptions {
  chat: ChatService;
  idempotency: IdempotencyStore<ChatResult>;
  /** SHUTDOWN_TIMEOUT_MS: how long the app may take to close before its connections are cut. */
  shutdownTimeoutMs: number;
  /** How long a stream's client may read nothing while an event waits for it before it is cut off. */
  writeStallMs: number;
  /** CHAT_CONCURRENCY_PER_USER: the turns one user may have running at once in this process. */
  chatsPerUser: number;
}

export const chatRoutes: FastifyPluginAsyncZod<ChatRoutesOptions> = async (app, { chat, idempotency, shutdownTimeoutMs, writeStallMs, chatsPerUser }) => {
  // While the app closes, turns in flight go on until shortly before the bound, then each is interrupted
  // and ends with an answer. The database closes only after every turn's bookkeeping is done.
  const turns = new InFlightTurns(chatsPerUser);
  const openStream = streamOpener(writeStallMs);
  let interruptTimer: NodeJS.Timeout | undefined;
  app.addHook('preClose', async () => {
    interruptTimer = setTimeout(() => turns.interruptAll(), Math.max(0, shutdownTimeoutMs - INTERRUPT_BEFORE_BOUND_MS));
  });
  app.addHook('onClose', async () => {
    await turns.settled();
    clearTimeout(interruptTimer);
  });

  app.post(
    '/chat',
    {
      bodyLimit: BODY_LIMIT_BYTES,
      config: { rateLimitGroup: 'chat', tokenCheckedByHandler: true },
      schema: {
        tags: ['chat'],
        operationId: 'chat',
        params: projectParams,
        headers: chatHeaders,
        body: chatBody,
        response: {
          200: {
            description: 'The turn: JSON, or with `stream: true` server-sent events',
            content: { 'application/json': { schema: chatResult }, 'text/event-stream': { schema: sseResponse } },
          },
        },
        problems: [
          'CONFLICT',
          'CONTEXT_TOO_LONG',
          'IDEMPOTENCY_CONFLICT',
          'IDEMPOTENCY_MISMATCH',
          'PROVIDER_ERROR',
          'PROVIDER_NOT_CONFIGURED',
          'PROVIDER_RATE_LIMITED',
          'PROVIDER_TIMEOUT',
        ],
        responseHeaders: {
          200: { 'Idempotent-Replayed': { type: 'string', description: '`true` on a replay of an Idempotency-Key\'s first result: no provider was called, and no message stored' } },
          409: { 'Retry-After': { type: 'integer', description: 'IDEMPOTENCY_CONFLICT: seconds after which the request may be sent again, to be replayed once answered' } },
        },
      },
    },
    // A turn holds one of its user's slots from before its first read until its last bookkeeping. A replay
    // does too, briefly: only the claim, a read, tells it from a new turn, and the cap comes before any work.
    (request, reply) =>
      turns.run(request.user.id, async (interrupt) => {
        const { projectId } = request.params;
        const { message, stream = false } = request.body;
        const userId = request.user.id;
        const key = request.headers['idempotency-key'];

        // A replay says so, as Stripe's API does: a client that counts answers (their usage, to bill it) counts one once.
        const replay = (first: ChatResult) => {
          reply.header('idempotent-replayed', 'true');
          return stream ? replayAsStream(openStream, first, request, reply) : first;
        };
        // The project as stored: a UUID in capitals names the same one, and a retry may spell it either way.
        // Only a keyed turn needs it: hashing a message of up to 100,000 characters is no work to do for nothing.
        const hash = () => requestHash({ projectId: projectId.toLowerCase(), message, stream });
        // A keyed turn may still be refused (or replayed) after its checks: its question waits for the claim.
        const prepare = () => chat.prepare(request.user, projectId, message, { idempotencyKey: key, stream, log: request.log });
        let turn: PreparedTurn;
        try {
          turn = await prepare();
        } catch (error) {
          // Refused for what the project is now (its provider, its model's budget, its prompts), after the
          // token and the project were checked: a key whose request was answered before that changed
          // still has its first result, which a retry is owed; one whose request still runs is 409.
          const first = key && error instanceof ApiError && REFUSED_AS_SET_NOW.has(error.code) ? await idempotency.replay(userId, key, hash()) : undefined;
          if (!first) throw error;
          return replay(first);
        }
        // `keep` runs before the client hears the turn is done, so that a retry it sends then is a replay.
        const answer = (keyed?: KeyedTurn) =>
          stream ? streamTurn(chat, openStream, turn, request, reply, interrupt, keyed) : chat.complete(turn, interrupt, keyed?.keep);
        if (!key) return answer();

        const claim = await idempotency.claim(userId, turn.projectId, key, hash());
        if (claim.kind === 'replay') return replay(claim.response);
        // A stream may run past any fixed bound, each chunk pushing its deadline back: as long as its deltas
        // reach its client (or its model's thinking arrives), its key is not taken over. A JSON turn ends
        // within its deadline, half the time after which a silent key is stale, so it needs no beat.
        const { claimId } = claim;
        const hold = stream ? idempotency.keepAlive(userId, key, claimId) : undefined;
        // Only a complete answer is kept for replay; after a failure the same key may be retried. A key
        // that cannot be released (the database failing) is taken over once stale: its failure is logged,
        // and the turn's own is what the client is told.
        const release = () =>
          idempotency.release(userId, key, claimId).catch((error: unknown) => request.log.warn({ err: error }, 'idempotency key not released'));
        let result: ChatResult | undefined;
        try {
          // A retry after an attempt that failed asks its question again: the attempt's question is marked
          // failed, and the context, read with it before the claim, is read again.
          if (await chat.retireEarlierAttempts(turn, key)) turn = await prepare();
          result = await answer({ keep: (tx, done) => idempotency.complete(userId, key, claimId, done, tx), progressed: () => hold?.progressed() });
        } catch (error) {
          await release();
          throw error;
        } finally {
          hold?.stop();
        }
        if (!result) await release();
        return stream ? reply : result;
      }),
  );
};

/** What a turn with an Idempotency-Key does beside answering. */
interface KeyedTurn {
  /** Stores a complete result for replay, with its answer, before it is announced. */
  keep: KeepResult;
  /** A delta reached the client: the key's request is alive. */
  progressed(): void;
}

/** Takes a reply over for server-sent events; `interrupt`, the turn's, when there is one. */
type StreamOpener = (request: FastifyRequest, reply: FastifyReply, interrupt?: AbortSignal) => EventStream;

function streamOpener(stallMs: number): StreamOpener {
  return (request, reply, interrupt) => {
    reply.hijack();
    const stalled = () => request.log.info({ stallMs }, 'stream cut off: its client took nothing of it for AI_TIMEOUT_MS');
    const events = new EventStream(reply.raw, HEARTBEAT_MS, stallMs, interrupt, stalled);
    // What the hooks set (x-request-id, the security headers, CORS): a hijacked reply does not send it by itself.
    events.open(reply.getHeaders());
    request.server.metrics.trackStream(reply.raw);
    return events;
  };
}

/**
 * Streams one turn over SSE; resolves with the result when the answer was complete. The stream opens
 * once the user message is stored: a failure before that is an ordinary problem+json response.
 */
async function streamTurn(
  chat: ChatService,
  openStream: StreamOpener,
  turn: PreparedTurn,
  request: FastifyRequest,
  reply: FastifyReply,
  interrupt: AbortSignal,
  keyed?: KeyedTurn,
): Promise<ChatResult | undefined> {
  let events: EventStream | undefined;
  let userMessageId: string | undefined;
  // A client may have left while the turn was prepared: then the turn calls no provider for it.
  const clientGone = clientGoneSignal(reply);
  try {
    const outcome = await chat.stream(
      turn,
      {
        userMessage: (userMessage) => {
          userMessageId = userMessage.id;
          events = openStream(request, reply, interrupt);
          return events.send('user_message', { userMessage });
        },
        delta: (content) => {
          const written = events!.send('delta', { content });
          // The key's request is alive once its client has the delta.
          if (written) return keyed ? written.then(() => keyed.progressed()) : written;
          keyed?.progressed();
        },
        // And while a reasoning model thinks, sending no delta for longer than a key takes to go stale.
        progress: () => keyed?.progressed(),
      },
      clientGone,
      interrupt,
      keyed?.keep,
    );
    if (outcome.kind === 'complete') {
      const { assistantMessage, usage } = outcome.result;
      await events!.send('done', { assistantMessage, usage });
      return outcome.result;
    }
    if (outcome.kind === 'failed') {
      // As a JSON turn's error handler answers it (a turn whose account was deleted meanwhile is 401, not
      // 404), and logs it: what the upstream answered is for the log only.
      const error = await request.refusal(outcome.error);
      const problem = toProblem(error, request);
      logFailure(request, error, problem, 'chat stream failed');
      markStreamFailed(reply, problem);
      await events!.send('error', problem);
    }
    return undefined;
  } catch (error) {
    if (!events) throw error;
    // After the headers nothing can change the status: the failure becomes the stream's last event, as the
    // error handler would answer it (a database lost mid-stream is a 503), naming the stored question.
    const refusal = await request.refusal(error as Error);
    const problem = toProblem(refusal, request);
    logFailure(request, error, problem, 'chat stream failed');
    markStreamFailed(reply, problem);
    await events.send('error', refusal === error ? { ...problem, userMessageId } : problem);
    return undefined;
  } finally {
    events?.end();
  }
}

async function replayAsStream(openStream: StreamOpener, result: ChatResult, request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const events = openStream(request, reply);
  await events.send('user_message', { userMessage: result.userMessage });
  await events.send('delta', { content: result.assistantMessage.content });
  await events.send('done', { assistantMessage: result.assistantMessage, usage: result.usage });
  events.end();
  return reply;
}
