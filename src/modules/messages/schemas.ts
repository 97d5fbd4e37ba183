import { z } from 'zod';
import type { messages } from '../../db/schema.js';
import { pageOf, pageQuery, timeSortKey } from '../../http/pagination.js';
import { isoString } from '../../iso-string.js';

const tokens = z.number().int().nonnegative();
export const usage = z
  .object({ promptTokens: tokens, completionTokens: tokens, totalTokens: tokens })
  .meta({ id: 'Usage' });

export const message = z
  .object({
    id: z.uuid(),
    projectId: z.uuid(),
    role: z.enum(['user', 'assistant', 'system']),
    content: z.string(),
    status: z.enum(['complete', 'incomplete', 'failed']),
    model: z.string().nullable(),
    usage: usage.nullable(),
    createdAt: z.iso.datetime(),
  })
  .meta({ id: 'Message' });

export type MessageDto = z.infer<typeof message>;
export type MessageRow = typeof messages.$inferSelect;

/** The API shape of a stored message; chat answers with the same. */
export function toMessageDto(row: MessageRow): MessageDto {
  const { promptTokens, completionTokens, totalTokens } = row;
  return {
    id: row.id,
    projectId: row.projectId,
    role: row.role,
    content: row.content,
    status: row.status,
    model: row.model,
    // A message without a reported usage (a user message, a provider that sent none) has none at all.
    usage:
      promptTokens !== null && completionTokens !== null && totalTokens !== null
        ? { promptTokens, completionTokens, totalTokens }
        : null,
    createdAt: isoString(row.createdAt),
  };
}

export const messageListQuery = pageQuery(timeSortKey);
export const messagePage = pageOf(message);
