import { z } from 'zod';
import { storableText } from '../../http/text.js';
import { message, usage } from '../messages/schemas.js';

export const MAX_CHAT_MESSAGE_CHARS = 100_000;

export const chatBody = z.strictObject({
  message: storableText().min(1).max(MAX_CHAT_MESSAGE_CHARS),
  stream: z.boolean().optional(),
});

export const chatHeaders = z.object({
  'idempotency-key': z.string().min(1).max(255).optional(),
});

export const chatResult = z
  .object({ userMessage: message, assistantMessage: message, usage: usage.nullable() })
  .meta({ id: 'ChatResult' });

export type ChatResult = z.infer<typeof chatResult>;
