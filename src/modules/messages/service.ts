import type { Db } from '../../db/database.js';
import { messages } from '../../db/schema.js';
import type { Page, PageRequest, TimeSortKey } from '../../http/pagination.js';
import { inOwnedProject, pageOfProjectRowsByTime, requireOwnedProject } from '../projects/service.js';
import { type MessageDto, toMessageDto } from './schemas.js';

export class MessagesService {
  constructor(private readonly db: Db) {}

  /** The project's history, oldest first. */
  async list(userId: string, projectId: string, page: PageRequest<TimeSortKey>): Promise<Page<MessageDto>> {
    const { data, nextCursor } = await pageOfProjectRowsByTime(this.db, messages, userId, projectId, page);
    return { data: data.map(toMessageDto), nextCursor };
  }

  async clear(userId: string, projectId: string): Promise<void> {
    await requireOwnedProject(this.db, userId, projectId);
    await this.db.delete(messages).where(inOwnedProject(messages.projectId, userId, projectId));
  }
}
