import { sql } from 'drizzle-orm';
import { bigint, check, index, integer, jsonb, pgTable, primaryKey, text, timestamp, uniqueIndex, uuid } from 'drizzle-orm/pg-core';

const timestamps = {
  createdAt: timestamp('created_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
  updatedAt: timestamp('updated_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
};

export const users = pgTable(
  'users',
  {
    id: uuid('id').primaryKey(),
    email: text('email').notNull(),
    passwordHash: text('password_hash').notNull(),
    name: text('name').notNull(),
    // Bumped on every password change; a token carrying an older version is revoked.
    tokenVersion: integer('token_version').notNull().default(0),
    // The newest list key made under the row (see `limitedInsert`), deleted rows' included: a new one comes after it.
    newestProjectId: uuid('newest_project_id'),
    ...timestamps,
  },
  (t) => [uniqueIndex('users_email_lower_key').on(sql`lower(${t.email})`)],
);

export const projects = pgTable(
  'projects',
  {
    id: uuid('id').primaryKey(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    name: text('name').notNull(),
    description: text('description'),
    provider: text('provider', { enum: ['openai', 'openrouter'] }),
    model: text('model'),
    newestPromptId: uuid('newest_prompt_id'),
    newestFileCreatedAt: timestamp('newest_file_created_at', { withTimezone: true, mode: 'date' }),
    ...timestamps,
  },
  (t) => [index('projects_user_id_id_idx').on(t.userId, t.id)],
);

export const prompts = pgTable(
  'prompts',
  {
    id: uuid('id').primaryKey(),
    projectId: uuid('project_id')
      .notNull()
      .references(() => projects.id, { onDelete: 'cascade' }),
    title: text('title').notNull(),
    content: text('content').notNull(),
    // The content's tokens in `token_encoding`, stored by the first turn that counts them, so that a
    // later turn refuses prompts past its budget without reading them; null until then, and again
    // whenever the content changes (a trigger, migration 0016).
    tokens: integer('tokens'),
    tokenEncoding: text('token_encoding'),
    ...timestamps,
  },
  (t) => [index('prompts_project_id_id_idx').on(t.projectId, t.id)],
);

export const messages = pgTable(
  'messages',
  {
    id: uuid('id').primaryKey(),
    projectId: uuid('project_id')
      .notNull()
      .references(() => projects.id, { onDelete: 'cascade' }),
    role: text('role', { enum: ['user', 'assistant', 'system'] }).notNull(),
    content: text('content').notNull(),
    status: text('status', { enum: ['complete', 'incomplete', 'failed'] }).notNull(),
    model: text('model'),
    promptTokens: integer('prompt_tokens'),
    completionTokens: integer('completion_tokens'),
    totalTokens: integer('total_tokens'),
    // The content's tokens in `token_encoding`, counted once when stored, so that building a context
    // never re-counts history; null for rows stored without (they are counted when read).
    tokens: integer('tokens'),
    tokenEncoding: text('token_encoding'),
    // An answer's question: turns that ran at once store their questions, then their answers, in the
    // order each came (Q1, Q2, A1, A2), and a context pairs each answer with its own question from this.
    // Null for questions, and for answers stored before it (migration 0015), each taken for an answer to
    // the message before it.
    replyTo: uuid('reply_to'),
    // A question's Idempotency-Key, when its turn had one: a retry with the key after a failed attempt
    // marks the attempt's question failed, so that the model is not sent the question twice (with the
    // first attempt's cut-off answer). Null for answers, unkeyed questions and those stored before it.
    idempotencyKey: text('idempotency_key'),
    createdAt: timestamps.createdAt,
  },
  (t) => [
    index('messages_project_id_created_at_id_idx').on(t.projectId, t.createdAt, t.id),
    index('messages_project_id_idempotency_key_idx').on(t.projectId, t.idempotencyKey).where(sql`${t.idempotencyKey} is not null`),
    // What a turn counts of its project's failed questions: its history's revision (see `turnStatementOn`).
    index('messages_project_id_failed_idx').on(t.projectId).where(sql`${t.status} = 'failed'`),
    check('messages_role_check', sql`${t.role} in ('user', 'assistant', 'system')`),
    check('messages_status_check', sql`${t.status} in ('complete', 'incomplete', 'failed')`),
  ],
);

export const files = pgTable(
  'files',
  {
    id: uuid('id').primaryKey(),
    projectId: uuid('project_id')
      .notNull()
      .references(() => projects.id, { onDelete: 'cascade' }),
    filename: text('filename').notNull(),
    mimeType: text('mime_type').notNull(),
    size: bigint('size', { mode: 'number' }).notNull(),
    sha256: text('sha256').notNull(),
    storageUrl: text('storage_url').notNull(),
    providerFileId: text('provider_file_id'),
    createdAt: timestamps.createdAt,
  },
  (t) => [
    index('files_project_id_created_at_id_idx').on(t.projectId, t.createdAt, t.id),
    // Whether a row names a provider copy queued before its row was written (see `ProviderCopies.reserve`).
    index('files_provider_file_id_idx').on(t.providerFileId).where(sql`${t.providerFileId} is not null`),
  ],
);

/**
 * Projects deleted lately, whatever deleted them (the project, its account): a trigger on `projects`
 * (migration 0013) writes each in the delete's transaction. The start's sweep of stray bytes removes
 * those under a project of this database's, held or deleted (bytes a crash left between a delete's
 * commit and their removal), and never those of a project it knows nothing of: the folder may be
 * another database's. The sweep prunes them once no byte of theirs can be waiting for it.
 */
export const deletedProjects = pgTable('deleted_projects', {
  id: uuid('id').primaryKey(),
  deletedAt: timestamp('deleted_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
});

/**
 * Provider copies (OpenAI's Files API) of deleted files, still to be deleted upstream, and copies just
 * made whose row is not written yet (due a day later: see `ProviderCopies.reserve`). A file row's
 * deletion queues its copy in the same transaction (a trigger on `files`: migration 0006), whatever
 * deleted it (the file, its project, its account), so that a provider that is down or slow when the
 * file goes leaves no copy behind for good: its deletion is tried again, later, until it is done.
 * `dueAt` is when next; a try pushes it forward before it calls the provider (see `ProviderCopies`).
 */
export const providerFileDeletions = pgTable(
  'provider_file_deletions',
  {
    providerFileId: text('provider_file_id').primaryKey(),
    attempts: integer('attempts').notNull().default(0),
    dueAt: timestamp('due_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
    createdAt: timestamp('created_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
  },
  (t) => [index('provider_file_deletions_due_at_idx').on(t.dueAt)],
);

/**
 * Idempotency keys of POST chat, per user. `requestHash` identifies the request the key was first used
 * with; `response` holds its result once finished, replayed for 24 h.
 */
export const idempotencyKeys = pgTable(
  'idempotency_keys',
  {
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    key: text('key').notNull(),
    /**
     * The project the key's turn chatted with, set when the key is claimed (the project checked first), so
     * that the result kept for replay (the question and the answer, whole) goes with the project and with
     * its cleared history (`clear_project_messages`). Null for keys of the code before it (0014).
     */
    projectId: uuid('project_id').references(() => projects.id, { onDelete: 'cascade' }),
    requestHash: text('request_hash').notNull(),
    state: text('state', { enum: ['running', 'done'] }).notNull(),
    response: jsonb('response'),
    createdAt: timestamp('created_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
    /** While `running`: when the request holding the key last said it is still at work. */
    aliveAt: timestamp('alive_at', { withTimezone: true, mode: 'date' }).notNull().defaultNow(),
    /**
     * Which claim holds the key: set on every claim and takeover, and required by whatever the holder
     * writes later (see `IdempotencyStore.claim`). Nullable for a rolling deploy: an instance of the code
     * before it inserts without it (null), takes a key over leaving it as it was, and completes or releases
     * by user and key alone, as it always did; so until every instance runs this code, a holder that lost
     * its key to such an instance may still finish it, and one on such an instance may still free a key
     * taken from it.
     */
    claimId: uuid('claim_id'),
  },
  (t) => [
    primaryKey({ columns: [t.userId, t.key] }),
    index('idempotency_keys_created_at_idx').on(t.createdAt),
    index('idempotency_keys_project_id_idx').on(t.projectId),
  ],
);

export const schema = { users, projects, prompts, messages, files, providerFileDeletions, deletedProjects, idempotencyKeys };
