import { and, asc, getTableColumns, sql } from 'drizzle-orm';
import type { Db } from '../../db/database.js';
import { messages } from '../../db/schema.js';
import { type Page, type PageRequest, paginate } from '../../http/pagination.js';
import { inOwnedProject, requireOwnedProject } from '../projects/service.js';
import { type MessageDto, type MessageSortKey, toMessageDto } from './schemas.js';

const createdAtMicros = sql<string>`(extract(epoch from ${messages.createdAt}) * 1000000)::bigint::text`;

/** Rows after the cursor, as a row comparison so that the (project_id, created_at, id) index serves it. */
function after([micros, id]: MessageSortKey) {
  return sql`(${messages.createdAt}, ${messages.id}) > (timestamptz 'epoch' + ${micros}::bigint * interval '1 microsecond', ${id}::uuid)`;
}

export class MessagesService {
  constructor(private readonly db: Db) {}

  /** The project's history, oldest first. */
  async list(userId: string, projectId: string, page: PageRequest<MessageSortKey>): Promise<Page<MessageDto>> {
    await requireOwnedProject(this.db, userId, projectId);
    const { data, nextCursor } = await paginate(
      page,
      (cursor, take) =>
        this.db
          .select({ ...getTableColumns(messages), createdAtMicros })
          .from(messages)
          .where(and(inOwnedProject(messages.projectId, userId, projectId), cursor && after(cursor)))
          .orderBy(asc(messages.createdAt), asc(messages.id))
          .limit(take),
      (row): MessageSortKey => [row.createdAtMicros, row.id],
    );
    return { data: data.map(toMessageDto), nextCursor };
  }

  async clear(userId: string, projectId: string): Promise<void> {
    await requireOwnedProject(this.db, userId, projectId);
    await this.db.delete(messages).where(inOwnedProject(messages.projectId, userId, projectId));
  }
}
