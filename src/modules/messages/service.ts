import { sql } from 'drizzle-orm';
import type { Database } from '../../db/database.js';
import { messages } from '../../db/schema.js';
import type { Page, PageRequest, TimeSortKey } from '../../http/pagination.js';
import { inOwnedProject, pageOfProjectRowsByTime, requireOwnedProject } from '../projects/service.js';
import { type MessageDto, toMessageDto } from './schemas.js';

export class MessagesService {
  constructor(private readonly database: Pick<Database, 'db' | 'transaction'>) {}

  /** The project's history, oldest first. */
  async list(userId: string, projectId: string, page: PageRequest<TimeSortKey>): Promise<Page<MessageDto>> {
    const { data, nextCursor } = await pageOfProjectRowsByTime(this.database.db, messages, userId, projectId, page);
    return { data: data.map(toMessageDto), nextCursor };
  }

  /**
   * Deletes the history under the lock that stores take (migration 0008), then with a snapshot taken
   * after it: every message stored before is deleted, and the answer of a turn whose question this
   * deletes is not stored after (see `message_kept`).
   */
  async clear(userId: string, projectId: string): Promise<void> {
    const project = await requireOwnedProject(this.database.db, userId, projectId);
    await this.database.transaction(async (tx) => {
      await tx.execute(sql`select lock_project_messages(${project.id})`);
      await tx.delete(messages).where(inOwnedProject(messages.projectId, userId, project.id));
    });
  }
}
