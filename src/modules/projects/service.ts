import { and, asc, eq, getTableColumns, getTableName, gt, type SQL, sql } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../../config.js';
import type { Database, Db } from '../../db/database.js';
import { direct } from '../../db/direct.js';
import { files, messages, projects, prompts, users } from '../../db/schema.js';
import { assertTokenCurrent, type AuthUser } from '../../http/auth.js';
import { NotFound, Unauthorized } from '../../http/errors.js';
import { isUuid } from '../../http/ids.js';
import { type IdSortKey, idSortKeyOf, type Page, type PageRequest, paginate, type TimeSortKey } from '../../http/pagination.js';
import type { ProviderName } from '../../providers/types.js';
import { waitForFileWrites } from '../files/deleting.js';
import type { StoredFileDiscarder } from '../files/service.js';
import type { ForgetsHistory } from '../chat/history-cache.js';
import { changedAt, type LimitedInsert, limitedInsert, param, type Parent, projectsPerUser } from './count-limit.js';
import type { CreateProjectInput, ProjectDto, UpdateProjectInput } from './schemas.js';
import { isoString } from '../../iso-string.js';

export type ProjectRow = typeof projects.$inferSelect;

/**
 * The one ownership rule: the project `projectId`, and only if it belongs to `userId`. Every query on
 * projects and on what they hold is built on it, so another user's project is indistinguishable from a
 * missing one. An id that cannot be a uuid is answered 404 here, before any query.
 */
export function ownedProject(userId: string, projectId: string): SQL {
  if (!isUuid(projectId)) throw new NotFound('Project');
  return and(eq(projects.id, projectId), eq(projects.userId, userId))!;
}

/** For rows under a project (prompts, messages, files): `projectIdColumn` is `projectId`, a project of `userId`. */
export function inOwnedProject(projectIdColumn: PgColumn, userId: string, projectId: string): SQL {
  return and(
    eq(projectIdColumn, projectId),
    sql`exists (select 1 from ${projects} where ${ownedProject(userId, projectId)})`,
  )!;
}

/**
 * One page of the rows of `table` (messages, files) under the caller's project, oldest first by
 * (created_at, id), as their index orders them: 404 when the project is not theirs. Rows after the
 * cursor are a row comparison, which the index serves.
 */
export async function pageOfProjectRowsByTime<Table extends typeof messages | typeof files>(
  db: Db,
  table: Table,
  userId: string,
  projectId: string,
  page: PageRequest<TimeSortKey>,
): Promise<Page<Table['$inferSelect']>> {
  const project = await requireOwnedProject(db, userId, projectId);
  const child = table as typeof files; // both tables have the `id`, `projectId` and `createdAt` columns used here
  const createdAtMicros = sql<string>`(extract(epoch from ${child.createdAt}) * 1000000)::bigint::text`;
  const after = ([micros, id]: TimeSortKey) =>
    sql`(${child.createdAt}, ${child.id}) > (timestamptz 'epoch' + ${micros}::bigint * interval '1 microsecond', ${id}::uuid)`;
  return paginate(
    page,
    `${getTableName(table)}:${project.id}`,
    (cursor, take) =>
      db
        .select({ ...getTableColumns(child), createdAtMicros })
        .from(child)
        .where(and(inOwnedProject(child.projectId, userId, projectId), cursor && after(cursor)))
        .orderBy(asc(child.createdAt), asc(child.id))
        .limit(take) as Promise<(Table['$inferSelect'] & { createdAtMicros: string })[]>,
    (row): TimeSortKey => [row.createdAtMicros, row.id],
  );
}

/** The caller's project, or 404 NOT_FOUND; for lists and inserts under it, where no row says whether it exists. */
export async function requireOwnedProject(db: Db, userId: string, projectId: string): Promise<ProjectRow> {
  const [row] = await db.select().from(projects).where(ownedProject(userId, projectId));
  if (!row) throw new NotFound('Project');
  return row;
}

function toDto(row: ProjectRow & { promptCount: number; messageCount: number; fileCount: number }): ProjectDto {
  return {
    id: row.id,
    name: row.name,
    description: row.description,
    // Only the validated request bodies write this column.
    provider: row.provider as ProviderName | null,
    model: row.model,
    createdAt: isoString(row.createdAt),
    updatedAt: isoString(row.updatedAt),
    counts: { prompts: row.promptCount, messages: row.messageCount, files: row.fileCount },
  };
}

/** A project's columns and its counts as correlated subqueries: one statement for one project or a whole page. */
function withCounts(db: Db) {
  return {
    ...getTableColumns(projects),
    promptCount: db.$count(prompts, eq(prompts.projectId, projects.id)),
    messageCount: db.$count(messages, eq(messages.projectId, projects.id)),
    fileCount: db.$count(files, eq(files.projectId, projects.id)),
  };
}

/** A project id as a statement parameter: one that cannot be a uuid matches no row instead of failing the cast. */
export const projectIdParam = (projectId: string) => (isUuid(projectId) ? projectId : null);

/** `ownedProject` as the parent of a create under a limit: its parameters `projectId` (see `projectIdParam`) and `userId`. */
export const callersProject: Parent = {
  table: projects,
  where: and(eq(projects.id, sql.placeholder('projectId')), eq(projects.userId, sql.placeholder('userId')))!,
};

export class ProjectsService {
  /** The caller's row (for the token check) joined with their project and its counts: one round trip. */
  private readonly projectOfUser;
  /** The user's row locked, the limit and the insert: one round trip, as the insert alone was. */
  private readonly insert: LimitedInsert<ProjectRow>;

  private readonly db: Db;

  constructor(
    private readonly database: Pick<Database, 'db' | 'transaction'>,
    private readonly storedFiles: StoredFileDiscarder,
    config: Pick<Config, 'MAX_PROJECTS_PER_USER'>,
    private readonly history: ForgetsHistory,
  ) {
    const db = (this.db = database.db);
    this.insert = limitedInsert(db, {
      name: 'create_project',
      limit: projectsPerUser(config.MAX_PROJECTS_PER_USER),
      parent: { table: users, where: eq(users.id, sql.placeholder('userId')) },
      table: projects,
      parentColumn: 'userId',
      order: { newId: 'new_project_id', newest: users.newestProjectId },
      values: {
        name: param('name', 'text'),
        description: param('description', 'text'),
        provider: param('provider', 'text'),
        model: param('model', 'text'),
      },
    });
    this.projectOfUser = direct(
      db
        .select({ tokenVersion: users.tokenVersion, ...withCounts(db) })
        .from(users)
        .leftJoin(projects, and(eq(projects.id, sql.placeholder('projectId')), eq(projects.userId, users.id)))
        .where(eq(users.id, sql.placeholder('userId')))
        .prepare('project_of_user'),
    );
  }

  async create(userId: string, input: CreateProjectInput): Promise<ProjectDto> {
    const params = {
      userId,
      name: input.name,
      description: input.description ?? null,
      provider: input.provider ?? null,
      model: input.model ?? null,
    };
    // No row of the caller: the account was deleted since the request's token was checked.
    const row = await this.insert.run(params, () => new Unauthorized());
    return toDto({ ...row, promptCount: 0, messageCount: 0, fileCount: 0 });
  }

  async list(userId: string, page: PageRequest<IdSortKey>): Promise<Page<ProjectDto>> {
    const { data, nextCursor } = await paginate(
      page,
      `projects:${userId}`,
      (after, take) =>
        this.db
          .select(withCounts(this.db))
          .from(projects)
          .where(and(eq(projects.userId, userId), after && gt(projects.id, after[0])))
          .orderBy(asc(projects.id))
          .limit(take),
      idSortKeyOf,
    );
    return { data: data.map(toDto), nextCursor };
  }

  /** For a route with `tokenCheckedByHandler`: checks the caller's token in the same statement. */
  async get(user: AuthUser, projectId: string): Promise<ProjectDto> {
    const [row] = await this.projectOfUser.execute({ userId: user.id, projectId: projectIdParam(projectId) });
    assertTokenCurrent(user, row);
    if (!row?.id) throw new NotFound('Project');
    return toDto(row as ProjectRow & { promptCount: number; messageCount: number; fileCount: number });
  }

  async update(userId: string, projectId: string, patch: UpdateProjectInput): Promise<ProjectDto> {
    const [row] = await this.db
      .update(projects)
      .set({ ...patch, updatedAt: changedAt(projects.updatedAt) })
      .where(ownedProject(userId, projectId))
      .returning(withCounts(this.db));
    if (!row) throw new NotFound('Project');
    return toDto(row);
  }

  /**
   * Foreign keys cascade to the project's prompts and messages. Its file rows are deleted first, in the
   * same transaction, because the cascade would forget which bytes and provider copies to remove; the
   * project is locked before, so that no upload adds a row between the two deletes for the cascade to
   * take (its insert waits, then finds no project: 404, and removes its bytes).
   */
  async delete(userId: string, projectId: string, log: FastifyBaseLogger): Promise<void> {
    const removedFiles = await this.database.transaction(async (tx) => {
      await waitForFileWrites(tx);
      await tx.select({ id: projects.id }).from(projects).where(ownedProject(userId, projectId)).for('update');
      const fileRows = await tx
        .delete(files)
        .where(inOwnedProject(files.projectId, userId, projectId))
        .returning({ id: files.id, projectId: files.projectId, providerFileId: files.providerFileId });
      const deleted = await tx.delete(projects).where(ownedProject(userId, projectId)).returning({ id: projects.id });
      if (deleted.length === 0) throw new NotFound('Project');
      return fileRows;
    });
    this.history.forget(projectId);
    await this.storedFiles.discard(removedFiles, log);
  }
}
