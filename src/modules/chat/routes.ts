import type { FastifyReply, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { problemBody } from '../../http/errors.js';
import { projectParams } from '../projects/schemas.js';
import { type IdempotencyStore, requestHash } from './idempotency.js';
import { chatBody, chatHeaders, type ChatResult, chatResult } from './schemas.js';
import type { ChatService, PreparedTurn } from './service.js';
import { EventStream } from './sse.js';

/** Comment heartbeats keep proxies and clients from closing an idle stream. */
const HEARTBEAT_MS = 15_000;

const sseResponse = z
  .string()
  .describe(
    'text/event-stream: `user_message` {userMessage}, then `delta` {content} events, then `done` ' +
      '{assistantMessage, usage}; or `error` with problem details. Each event has an id; `: ping` comments keep it open.',
  );

export const chatRoutes: FastifyPluginAsyncZod<{ chat: ChatService; idempotency: IdempotencyStore<ChatResult> }> = async (
  app,
  { chat, idempotency },
) => {
  app.post(
    '/chat',
    {
      schema: {
        tags: ['chat'],
        params: projectParams,
        headers: chatHeaders,
        body: chatBody,
        response: { 200: z.union([chatResult, sseResponse]) },
      },
    },
    async (request, reply) => {
      const { projectId } = request.params;
      const { message, stream = false } = request.body;
      const userId = request.user.id;
      const key = request.headers['idempotency-key'];

      const turn = await chat.prepare(userId, projectId, message);
      if (!key) return stream ? streamTurn(chat, turn, request, reply) : chat.complete(turn);

      const claim = await idempotency.claim(userId, key, requestHash({ projectId, message, stream }));
      if (claim.kind === 'replay') return stream ? replayAsStream(claim.response, request, reply) : claim.response;
      try {
        const result = stream ? await streamTurn(chat, turn, request, reply) : await chat.complete(turn);
        // Only a complete answer is kept for replay; after a failure the same key may be retried.
        if (result) await idempotency.complete(userId, key, result);
        else await idempotency.release(userId, key);
        return stream ? reply : result;
      } catch (error) {
        await idempotency.release(userId, key);
        throw error;
      }
    },
  );
};

function openStream(request: FastifyRequest, reply: FastifyReply): EventStream {
  reply.hijack();
  const events = new EventStream(reply.raw, HEARTBEAT_MS);
  events.open({ 'x-request-id': request.id });
  return events;
}

/**
 * Streams one turn over SSE; resolves with the result when the answer was complete. The stream opens
 * once the user message is stored: a failure before that is an ordinary problem+json response.
 */
async function streamTurn(
  chat: ChatService,
  turn: PreparedTurn,
  request: FastifyRequest,
  reply: FastifyReply,
): Promise<ChatResult | undefined> {
  let events: EventStream | undefined;
  const clientGone = new AbortController();
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) clientGone.abort();
  });
  try {
    const outcome = await chat.stream(
      turn,
      {
        userMessage: (userMessage) => {
          events = openStream(request, reply);
          return events.send('user_message', { userMessage });
        },
        delta: (content) => events!.send('delta', { content }),
      },
      clientGone.signal,
    );
    if (outcome.kind === 'complete') {
      const { assistantMessage, usage } = outcome.result;
      await events!.send('done', { assistantMessage, usage });
      return outcome.result;
    }
    if (outcome.kind === 'failed') {
      const { error } = outcome;
      request.log.warn({ code: error.code, detail: error.message }, 'chat stream failed');
      await events!.send('error', problemBody(request, error.status, error.code, error.message, error.extensions));
    }
    return undefined;
  } catch (error) {
    if (!events) throw error;
    // After the headers nothing can change the status: the failure becomes the stream's last event.
    request.log.error({ err: error }, 'chat stream failed');
    await events.send('error', problemBody(request, 500, 'INTERNAL', 'An unexpected error occurred'));
    return undefined;
  } finally {
    events?.end();
  }
}

async function replayAsStream(result: ChatResult, request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const events = openStream(request, reply);
  await events.send('user_message', { userMessage: result.userMessage });
  await events.send('delta', { content: result.assistantMessage.content });
  await events.send('done', { assistantMessage: result.assistantMessage, usage: result.usage });
  events.end();
  return reply;
}
