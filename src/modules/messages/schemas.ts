import { z } from 'zod';
import type { messages } from '../../db/schema.js';
import { pageOf, pageQuery } from '../../http/pagination.js';

export const usage = z
  .object({ promptTokens: z.number().int(), completionTokens: z.number().int(), totalTokens: z.number().int() })
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
    createdAt: row.createdAt.toISOString(),
  };
}

/**
 * Messages sort by (created_at, id), the order of their index. The time is carried as microseconds since
 * the epoch: a Date keeps only milliseconds, and a cursor cut to them would return the rows of
 * its last millisecond again.
 */
export const messageSortKey = z.tuple([z.string().regex(/^-?\d{1,16}$/), z.uuid()]);
export type MessageSortKey = z.infer<typeof messageSortKey>;

export const messageListQuery = pageQuery(messageSortKey);
export const messagePage = pageOf(message);
