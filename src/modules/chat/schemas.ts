import { z } from 'zod';
import { spokenText } from '../../http/text.js';
import { message, usage } from '../messages/schemas.js';

export const MAX_CHAT_MESSAGE_CHARS = 100_000;

export const chatBody = z.strictObject({
  message: spokenText().max(MAX_CHAT_MESSAGE_CHARS),
  stream: z.boolean().optional(),
});

export const chatHeaders = z.object({
  'idempotency-key': z.string().min(1).max(255).optional(),
});

export const chatResult = z
  .object({ userMessage: message, assistantMessage: message, usage: usage.nullable() })
  .meta({ id: 'ChatResult' });

export type ChatResult = z.infer<typeof chatResult>;

/**
 * The data of a streamed turn's events, by event name, as the document names them (`error`'s is the
 * Problem). Documentation: the route writes each event itself (src/modules/chat/routes.ts), and
 * `test/http/openapi.test.ts` holds the events a stream sends to these.
 */
export const streamEvents = {
  user_message: z.object({ userMessage: message }).meta({ id: 'ChatUserMessageEvent', description: 'The question, stored' }),
  delta: z.object({ content: z.string() }).meta({ id: 'ChatDeltaEvent', description: 'A piece of the answer, as the provider sent it' }),
  done: z.object({ assistantMessage: message, usage: usage.nullable() }).meta({ id: 'ChatDoneEvent', description: 'The answer as it ended, stored: `complete`, or `incomplete` when the provider cut it short (its output limit, its content filter)' }),
};
