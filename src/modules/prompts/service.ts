import { and, asc, eq, gt, type SQL } from 'drizzle-orm';
import type { Config } from '../../config.js';
import type { Db } from '../../db/database.js';
import { projects, prompts } from '../../db/schema.js';
import { NotFound } from '../../http/errors.js';
import { isUuid } from '../../http/ids.js';
import { type IdSortKey, idSortKeyOf, type Page, type PageRequest, paginate } from '../../http/pagination.js';
import { changedAt, type LimitedInsert, limitedInsert, param, promptsPerProject } from '../projects/count-limit.js';
import { callersProject, inOwnedProject, projectIdParam, requireOwnedProject } from '../projects/service.js';
import type { CreatePromptInput, PromptDto, UpdatePromptInput } from './schemas.js';
import { isoString } from '../../iso-string.js';

type PromptRow = typeof prompts.$inferSelect;

function toDto(row: PromptRow): PromptDto {
  return {
    id: row.id,
    projectId: row.projectId,
    title: row.title,
    content: row.content,
    createdAt: isoString(row.createdAt),
    updatedAt: isoString(row.updatedAt),
  };
}

/** The prompt `promptId` of the caller's project `projectId`; a prompt elsewhere is as missing as no prompt. */
function ownedPrompt(userId: string, projectId: string, promptId: string): SQL {
  if (!isUuid(promptId)) throw new NotFound('Prompt');
  return and(eq(prompts.id, promptId), inOwnedProject(prompts.projectId, userId, projectId))!;
}

export class PromptsService {
  /** The owner check, the limit and the insert: one round trip. */
  private readonly insert: LimitedInsert<PromptRow>;

  constructor(
    private readonly db: Db,
    config: Pick<Config, 'MAX_PROMPTS_PER_PROJECT'>,
  ) {
    this.insert = limitedInsert(db, {
      name: 'create_prompt',
      limit: promptsPerProject(config.MAX_PROMPTS_PER_PROJECT),
      parent: callersProject,
      table: prompts,
      parentColumn: 'projectId',
      order: { newId: 'new_prompt_id', newest: projects.newestPromptId },
      values: {
        title: param('title', 'text'),
        content: param('content', 'text'),
      },
    });
  }

  async create(userId: string, projectId: string, input: CreatePromptInput): Promise<PromptDto> {
    const params = { userId, projectId: projectIdParam(projectId), ...input };
    return toDto(await this.insert.run(params, () => new NotFound('Project')));
  }

  /** Oldest first (by id), the order they reach the model. */
  async list(userId: string, projectId: string, page: PageRequest<IdSortKey>): Promise<Page<PromptDto>> {
    const project = await requireOwnedProject(this.db, userId, projectId);
    const { data, nextCursor } = await paginate(
      page,
      `prompts:${project.id}`,
      (after, take) =>
        this.db
          .select()
          .from(prompts)
          .where(and(inOwnedProject(prompts.projectId, userId, projectId), after && gt(prompts.id, after[0])))
          .orderBy(asc(prompts.id))
          .limit(take),
      idSortKeyOf,
    );
    return { data: data.map(toDto), nextCursor };
  }

  async get(userId: string, projectId: string, promptId: string): Promise<PromptDto> {
    const [row] = await this.db.select().from(prompts).where(ownedPrompt(userId, projectId, promptId));
    if (!row) throw new NotFound('Prompt');
    return toDto(row);
  }

  async update(userId: string, projectId: string, promptId: string, patch: UpdatePromptInput): Promise<PromptDto> {
    const [row] = await this.db
      .update(prompts)
      .set({ ...patch, updatedAt: changedAt(prompts.updatedAt) })
      .where(ownedPrompt(userId, projectId, promptId))
      .returning();
    if (!row) throw new NotFound('Prompt');
    return toDto(row);
  }

  async delete(userId: string, projectId: string, promptId: string): Promise<void> {
    const deleted = await this.db
      .delete(prompts)
      .where(ownedPrompt(userId, projectId, promptId))
      .returning({ id: prompts.id });
    if (deleted.length === 0) throw new NotFound('Prompt');
  }
}
