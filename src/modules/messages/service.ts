import { sql } from 'drizzle-orm';
import type { Database } from '../../db/database.js';
import { direct } from '../../db/direct.js';
import { messages } from '../../db/schema.js';
import type { Page, PageRequest, TimeSortKey } from '../../http/pagination.js';
import { NotFound } from '../../http/errors.js';
import type { ForgetsHistory } from '../chat/history-cache.js';
import { oneRow, param } from '../projects/count-limit.js';
import { pageOfProjectRowsByTime, projectIdParam } from '../projects/service.js';
import { type MessageDto, toMessageDto } from './schemas.js';

export class MessagesService {
  /** `clear_project_messages` (migration 0010): the whole clear, one round trip. */
  private readonly clearStatement;

  constructor(
    private readonly database: Pick<Database, 'db'>,
    private readonly history: ForgetsHistory,
  ) {
    this.clearStatement = direct(
      database.db
        .select({ owned: sql<boolean>`clear_project_messages(${param('projectId', 'uuid')}, ${param('userId', 'uuid')})` })
        .from(oneRow)
        .prepare('messages_clear'),
    );
  }

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
    const [row] = await this.clearStatement.execute({ projectId: projectIdParam(projectId), userId });
    if (!row?.owned) throw new NotFound('Project');
    // Not kept in this process either.
    this.history.forget(projectId);
  }
}
