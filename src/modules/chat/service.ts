import { and, eq, getTableColumns, gt, ne, type SQL, sql, type SQLWrapper } from 'drizzle-orm';
import { uuidv7 } from '../../db/ids.js';
import { type Config, ConfigError } from '../../config.js';
import type { Database, Db } from '../../db/database.js';
import { direct } from '../../db/direct.js';
import { withFields } from '../../with-fields.js';
import { messages, projects, prompts, users } from '../../db/schema.js';
import { assertTokenCurrent, type AuthUser } from '../../http/auth.js';
import { ApiError, Conflict, FailureNaming, NotFound } from '../../http/errors.js';
import { CODE_POINTS_PER_ADDED_TOKEN, contextWindow, countTokens, countTokensPaced, encodingName, MESSAGE_OVERHEAD_TOKENS, PACED_TEXT, REPLY_PRIMING_TOKENS } from '../../providers/models.js';
import { CallDeadline } from '../../providers/abort.js';
import { TokenCounts } from '../../providers/token-counts.js';
import type { ProviderRegistry } from '../../providers/registry.js';
import {
  type ChatMessage,
  type CallLog,
  type ChatRequest,
  type DeltaSink,
  type ProviderAdapter,
  type ProviderName,
  ProviderError,
  ProviderTimeout,
  type ReplyEnd,
  type Usage,
} from '../../providers/types.js';
import { chatFilesOf, type FilesService } from '../files/service.js';
import { type MessageDto, type MessageRow, toMessageDto } from '../messages/schemas.js';
import { oneRow, param } from '../projects/count-limit.js';
import { projectIdParam } from '../projects/service.js';
import { buildContext, type HistoryMessage, type HistoryPage } from './context.js';
import { type Continuation, HistoryCache, type StoredHistoryMessage } from './history-cache.js';
import { KeyTakenOver, REPLAY_WINDOW } from './idempotency.js';
import type { ChatResult } from './schemas.js';

/** A UTF-16 surrogate without its other half (what `String.prototype.toWellFormed`, ES2024, replaces). */
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/** Models we know nothing about get this context window, as the contract says. */
const DEFAULT_CONTEXT_TOKENS = 16_000;
/**
 * History is read from the newest end, only as far as the budget reaches: this many rows with the rest
 * of the turn's statement (most turns need no more), then pages four times as large each time, up to
 * the last size.
 */
const HISTORY_PAGES = [64, 256, 1024, 4096];

/**
 * Up to `limit` messages of the project, newest first, older than the stored message `before` when
 * given, as one JSON array: a single value to parse instead of a row to map per message. The keyset
 * is the index order, compared against the stored row itself (its timestamp has microseconds). A
 * `failed` question (its turn stored no answer, see `ChatService.markFailed`) is history to read, not
 * context: a question asked again after a failure is sent once, and no two questions go in a row.
 *
 * With `room`, the page stops at the first message that the budget left (`room` tokens) cannot hold
 * even counting only what is known for sure: stored counts in `encoding` (a message counted in another
 * encoding, or never, counts as its framing alone). Every message that may fit is still read, and the
 * reader, counting exactly, stops within the page.
 */
function historyPage(
  projectId: SQLWrapper,
  before: SQLWrapper | undefined,
  limit: SQLWrapper | number,
  budget?: { room: SQLWrapper; encoding: SQLWrapper },
): SQL<StoredHistoryMessage[]> {
  const newest = sql`select * from ${messages} where ${messages.projectId} = ${projectId} and ${messages.status} <> 'failed'
      ${before ? sql`and (${messages.createdAt}, ${messages.id}) < (select b.created_at, b.id from ${messages} b where b.id = ${before})` : sql``}
      order by ${messages.createdAt} desc, ${messages.id} desc limit ${limit}`;
  const rows = budget
    ? sql`(select * from (select p.*, coalesce(sum(${sql.raw(String(MESSAGE_OVERHEAD_TOKENS))} +
          case when p.token_encoding = ${budget.encoding} then coalesce(p.tokens, 0) else 0 end)
          over (order by p.created_at desc, p.id desc rows between unbounded preceding and 1 preceding), 0) as tokens_before
        from (${newest}) p) q where q.tokens_before <= ${budget.room})`
    : sql`(${newest})`;
  return sql`(select coalesce(json_agg(json_build_object('id', m.id, 'role', m.role, 'content', m.content, 'replyTo', m.reply_to,
      'tokens', m.tokens, 'encoding', m.token_encoding) order by m.created_at desc, m.id desc), '[]')
    from ${rows} m)`;
}

/**
 * A turn's one read: the caller's row (the token check), their project, its prompts, its files and the
 * newest page of its history; and, when nothing in it can refuse the turn, the question stored.
 */
export function turnStatementOn(db: Db) {
  // The prompts' tokens as stored in the default model's encoding, their framing included: at least
  // what they take in a turn of that model.
  const defaultEncoding = sql`${sql.placeholder('defaultEncoding')}::text`;
  const storedPromptTokens = sql`(select coalesce(sum(${prompts.tokens} + ${sql.raw(String(MESSAGE_OVERHEAD_TOKENS))}), 0)
    from ${prompts} where ${prompts.projectId} = ${projects.id} and ${prompts.tokenEncoding} = ${defaultEncoding})`;
  // The question, stored by the turn's read itself when nothing can refuse the turn then: the caller's
  // token is current, the project is theirs and chats with the server's default provider (configured)
  // and model, and the question is short enough to be counted before the read (see `prepare`), and its
  // prompts fit what the question's count leaves of that model's budget (`promptsRoom`), each by its
  // stored count, or else counted at most (its UTF-8 bytes and CODE_POINTS_PER_ADDED_TOKEN: the
  // database is UTF8, or SQL_ASCII, which keeps the bytes sent, see `DatabaseEncodingError`). Any other
  // turn is checked first and its question stored after (`storeQuestion`): a refused turn stores nothing.
  const question = db.$with('question', { createdAt: sql`created_at` }).as(
    sql`insert into ${messages} (id, project_id, role, content, status, tokens, token_encoding, created_at)
      select ${sql.placeholder('questionId')}::uuid, ${projects.id}, 'user', ${sql.placeholder('text')}::text, 'complete',
        ${sql.placeholder('tokens')}::integer, ${sql.placeholder('encoding')}::text, ${storedNow(projects.id)}
      from ${users} join ${projects} on ${projects.userId} = ${users.id}
      where ${users.id} = ${sql.placeholder('userId')} and ${users.tokenVersion} = ${sql.placeholder('tokenVersion')}::integer
        and ${projects.id} = ${sql.placeholder('projectId')} and ${projects.provider} is null and ${projects.model} is null
        -- The counts alone first: the check below reads every prompt not counted yet.
        and ${storedPromptTokens} <= ${sql.placeholder('promptsRoom')}::integer
        and (select coalesce(sum(case when ${prompts.tokenEncoding} = ${defaultEncoding} and ${prompts.tokens} is not null then ${prompts.tokens}
              else octet_length(${prompts.content}) + char_length(${prompts.content}) / ${sql.raw(String(CODE_POINTS_PER_ADDED_TOKEN))} end
            + ${sql.raw(String(MESSAGE_OVERHEAD_TOKENS))}), 0)
          from ${prompts} where ${prompts.projectId} = ${projects.id}) <= ${sql.placeholder('promptsRoom')}::integer
        -- And while the newest message of the history this statement reads is kept: the statement reads
        -- with the snapshot it began with, and a clear that committed while it waited for the history's
        -- lock (message_stamp) would have its deleted messages sent upstream. Not stored, the question
        -- is then stored after the read, under the same check (chat_insert_question), and refused: 409.
        and not exists (select 1 from (select ${messages.id} as id from ${messages}
            where ${messages.projectId} = ${projects.id} and ${messages.status} <> 'failed'
            order by ${messages.createdAt} desc, ${messages.id} desc limit 1) newest
          where not message_kept(${projects.id}, newest.id))
      returning created_at`,
  );
  return direct(
    db
      .with(question)
      .select({
        tokenVersion: users.tokenVersion,
        projectId: projects.id,
        provider: projects.provider,
        model: projects.model,
        // Not read when the prompts' stored counts alone pass what the question leaves of the default
        // model's budget (`promptsCap`): such a turn is refused whatever their content, which may be
        // megabytes (MAX_PROMPTS_PER_PROJECT of 100,000 characters).
        prompts: sql<TurnPrompt[] | null>`case when ${sql.placeholder('promptsCap')}::integer is null
            or ${projects.provider} is not null or ${projects.model} is not null or ${storedPromptTokens} <= ${sql.placeholder('promptsCap')}::integer
          then (select coalesce(json_agg(json_build_object('id', ${prompts.id}, 'updatedAt', ${prompts.updatedAt},
            'content', ${prompts.content}, 'tokens', ${prompts.tokens}, 'encoding', ${prompts.tokenEncoding}) order by ${prompts.id}), '[]')
          from ${prompts} where ${prompts.projectId} = ${projects.id}) end`,
        storedPromptTokens: sql<number>`${storedPromptTokens}`.mapWith(Number),
        files: chatFilesOf(projects.id),
        history: historyPage(projects.id, undefined, HISTORY_PAGES[0]!),
        // The history's revision (see `HistoryCache`), read with the page in one snapshot: how many of its
        // questions are marked failed, the one change made to a stored message (by any instance, of any
        // release, however deep in the history). A clear lowers it, but the page then lines up with nothing.
        historyRevision: sql<number>`(select count(*) from ${messages} where ${messages.projectId} = ${projects.id} and ${messages.status} = 'failed')`.mapWith(Number),
        // When the read stored the question: its time, as stored.
        questionStoredAt: sql<Date | null>`(select created_at from ${question})`.mapWith(messages.createdAt),
        // Stored or not, the commit flushes nothing: see `storeQuestion`.
        asyncCommit: sql`set_config('synchronous_commit', 'off', true)`,
      })
      .from(users)
      .leftJoin(projects, and(eq(projects.id, sql.placeholder('projectId')), eq(projects.userId, users.id)))
      .where(eq(users.id, sql.placeholder('userId')))
      .prepare('chat_turn'),
  );
}

type TurnRead = ReturnType<typeof turnStatementOn>;
type TurnRow = Awaited<ReturnType<TurnRead['execute']>>[number];

/**
 * Makes the stored message `questionId` durable. A transaction that writes to the log commits durably by
 * flushing the log up to its commit record, and so past every commit before it. A transactional logical
 * message is such a write that touches no row: no dead row version per turn, as a no-op update left,
 * and no UPDATE for readers of the change stream (logical decoding sees a message they can ignore by
 * its prefix). Written only when the message is stored: a transaction that writes nothing commits
 * without a flush, so a flush sent ahead of knowing (see `readTurn`) costs a refused turn no disk write.
 */
export function flushStatementOn(db: Db) {
  return direct(
    db
      .select({ flushed: sql`pg_logical_emit_message(true, 'chatbot-platform.durable', '')` })
      .from(messages)
      .where(eq(messages.id, sql.placeholder('questionId')))
      .prepare('chat_make_durable'),
  );
}

/**
 * Marks the stored question `questionId` failed: its turn ended with no answer stored. A durable commit,
 * so it makes the question durable too, as `chat_make_durable` would (see `flushStatementOn`).
 */
function failedStatementOn(db: Db) {
  return db
    .update(messages)
    .set({ status: 'failed' })
    .where(eq(messages.id, sql.placeholder('questionId')))
    .returning({ id: messages.id })
    .prepare('chat_mark_failed');
}

/**
 * Stores an answer, only while its question is stored (`message_kept`, migration 0008): a history cleared
 * during the turn took the question, and the answer would be all that was left of the turn.
 */
function answerStatementOn(db: Db) {
  const projectId = param('projectId', 'uuid');
  const questionId = param('questionId', 'uuid');
  const answer = db.$with('answer', getTableColumns(messages)).as(
    sql`insert into ${messages} (id, project_id, role, content, status, model, prompt_tokens, completion_tokens, total_tokens,
        tokens, token_encoding, reply_to, created_at)
      select ${param('id', 'uuid')}, ${projectId}, ${param('role', 'text')}, ${param('content', 'text')}, ${param('status', 'text')},
        ${param('model', 'text')}, ${param('promptTokens', 'integer')}, ${param('completionTokens', 'integer')}, ${param('totalTokens', 'integer')},
        ${param('tokens', 'integer')}, ${param('tokenEncoding', 'text')}, ${questionId}, ${storedNow(projectId)}
      where message_kept(${projectId}, ${questionId})
      returning *`,
  );
  return direct(db.with(answer).select().from(answer).prepare('chat_insert_message'));
}

interface TurnStatements {
  read: TurnRead;
  flush: ReturnType<typeof flushStatementOn>;
  insertAnswer: ReturnType<typeof answerStatementOn>;
}

interface CountedReply {
  content: string;
  tokens: number;
}

/** A project's prompt as a turn reads it: its version (id and last change) names its token count. */
interface TurnPrompt {
  id: string;
  updatedAt: string;
  content: string;
  /** As stored (see `prompts.tokens`). */
  tokens: number | null;
  encoding: string | null;
}

/** A prompt's tokens that a turn counted, and the version of the prompt it counted. */
type PromptCount = Pick<TurnPrompt, 'id' | 'updatedAt'> & { tokens: number };

/** What names a turn's question, stored or to be. */
type TurnOfQuestion = Pick<PreparedTurn, 'projectId'> & { question: { id: string } };

/** Everything a turn needs, settled before anything is stored: a rejected turn leaves no trace. */
export interface PreparedTurn {
  projectId: string;
  adapter: ProviderAdapter;
  model: string;
  context: ChatMessage[];
  /** The user message, its tokens counted for `model`; the database stamps its time when it stores it. */
  question: UnstampedMessage;
  /** When the turn's read stored `question` already (see `ChatService.prepare`): the time it was stored at. */
  questionStoredAt?: Date;
  /** Otherwise, the newest message of the history the context was read with, if any: the question is stored only while it is. */
  historyFrom?: string;
  /** A streamed turn whose read stored the question: its flush, sent right behind the read. */
  durable?: Promise<unknown>;
  /** The log of the request the turn answers: its provider call's retries are logged there. */
  log: CallLog;
}

/**
 * Keeps a turn's complete result for replay (its Idempotency-Key's) in the transaction that stores its
 * answer. Kept apart, a result that failed to be kept freed its key for a retry while the answer stayed
 * stored, and the retry stored a second one.
 */
export type KeepResult = (tx: Db, result: ChatResult) => Promise<void>;

/** What the streaming path tells its caller as the turn goes on. */
export interface TurnObserver {
  userMessage(message: MessageDto): void | Promise<void>;
  /** Each delta as it comes; a promise holds the rest of the reply back until it settles (see `DeltaSink`). */
  delta(content: string): ReturnType<DeltaSink>;
  /** The upstream sent a chunk with something in it, text or thinking: the turn is alive. */
  progress?(): void;
}

export type StreamOutcome =
  | { kind: 'complete'; result: ChatResult }
  /** The provider failed or was cut off; `error` names the stored user message. */
  | { kind: 'failed'; error: ApiError }
  | { kind: 'client-gone' };

/**
 * A message's time, stamped by the statement that stores it (`message_stamp`, migration 0008): later
 * than every message of `projectId` committed before, and under a lock of the project's held until its
 * own commit, so that messages of one project commit in the order of their times. Lists page by (time,
 * id): a message stamped early but committed late (a keyed turn waits for its claim, another builds its
 * context first, two turns run at once) would land behind a cursor already past the other, never to be
 * listed to that walk.
 */
const storedNow = (projectId: SQLWrapper) => sql`message_stamp(${projectId})`;

/** A message as the service builds it, before the database stamps its time. */
type UnstampedMessage = Omit<MessageRow, 'createdAt'>;

type NewMessage = Pick<MessageRow, 'role' | 'content' | 'status' | 'tokens'> &
  Partial<Pick<MessageRow, 'model' | 'promptTokens' | 'completionTokens' | 'totalTokens' | 'idempotencyKey'>>;

export class ChatService {
  /** The turn's statements, prepared on the pool and on each connection held for a streamed turn or a transaction. */
  private readonly statements = new WeakMap<Db, TurnStatements>();
  /** A further page of history, older than the stored message `before`. */
  private readonly historyPageStatement;
  private readonly insertQuestionStatement;
  private readonly markFailedStatement;
  private readonly retireAttemptsStatement;
  private readonly storePromptCountsStatement;
  /** Counts of prompts (by version) and of stored messages in an encoding they were not stored with (by id). */
  private readonly textCounts = new TokenCounts<number | Promise<number>>();
  /** The model and token budget of a project that names neither provider nor model, when its provider is configured. */
  private readonly defaultTurn: { model: string; encoding: string; budget: number } | undefined;

  constructor(
    private readonly database: Pick<Database, 'db' | 'hold' | 'transaction'>,
    private readonly providers: ProviderRegistry,
    private readonly files: FilesService,
    private readonly config: Pick<Config, 'AI_CONTEXT_TOKENS' | 'AI_MAX_OUTPUT_TOKENS' | 'AI_TIMEOUT_MS'>,
    /** Shared with what deletes messages, which forgets them here too (see `ForgetsHistory`). */
    private readonly historyCache: HistoryCache,
  ) {
    const { db } = database;
    const { defaultModel } = providers;
    this.defaultTurn =
      defaultModel === undefined ? undefined : { model: defaultModel, encoding: encodingName(defaultModel), budget: this.budgetFor(defaultModel) };

    this.historyPageStatement = direct(
      db
        .select({
          page: historyPage(sql.placeholder('projectId'), sql.placeholder('before'), sql.placeholder('limit'), {
            room: sql.placeholder('room'),
            encoding: sql.placeholder('encoding'),
          }),
        })
        .from(oneRow)
        .prepare('chat_history_page'),
    );
    const projectId = param('projectId', 'uuid');
    const historyFrom = param('historyFrom', 'uuid');
    // Stored only while the newest message of the history it was read with is (`message_kept`, under the
    // lock a clear takes): a history cleared between the read and this would otherwise have had its
    // deleted messages sent upstream, and the turn stored as the first of the history that followed.
    // `set_config(…, true)` lasts until the end of the statement's own transaction: its commit.
    const question = db.$with('question', { createdAt: sql<Date>`created_at`.mapWith(messages.createdAt).as('created_at') }).as(
      sql`insert into ${messages} (id, project_id, role, content, status, tokens, token_encoding, idempotency_key, created_at)
        select ${param('id', 'uuid')}, ${projectId}, ${param('role', 'text')}, ${param('content', 'text')}, ${param('status', 'text')},
          ${param('tokens', 'integer')}, ${param('tokenEncoding', 'text')}, ${param('idempotencyKey', 'text')}, ${storedNow(projectId)}
        where ${historyFrom} is null or message_kept(${projectId}, ${historyFrom})
        returning created_at, set_config('synchronous_commit', 'off', true)`,
    );
    this.insertQuestionStatement = direct(db.with(question).select({ createdAt: question.createdAt }).from(question).prepare('chat_insert_question'));
    this.markFailedStatement = failedStatementOn(db);
    // Within the replay window a key is claimed again only when its earlier attempts did not complete (a
    // completed one is replayed): those that asked the same question are the ones asked again. (A key
    // freed by a failure may be sent with another message: a new turn, which takes nothing back.) Past
    // the window, a key may be reused for the same question, answered then: what was asked stays as it is.
    // The window runs from the question, stamped a moment after its key's claim: a completed turn's key
    // reused in the moment past its window with the same message would have its question marked.
    this.retireAttemptsStatement = db
      .update(messages)
      .set({ status: 'failed' })
      .where(
        and(
          eq(messages.projectId, sql.placeholder('projectId')),
          eq(messages.idempotencyKey, sql.placeholder('key')),
          eq(messages.content, sql.placeholder('content')),
          eq(messages.role, 'user'),
          ne(messages.status, 'failed'),
          gt(messages.createdAt, sql`now() - interval '${sql.raw(REPLAY_WINDOW)}'`),
        ),
      )
      .returning({ id: messages.id })
      .prepare('chat_retire_attempts');
    // A prompt changed since it was counted has another `updatedAt` (and its count is back to null); one
    // that another turn stored meanwhile is not written again. A count is worth no flush to disk: lost in
    // a crash, it is counted again (`set_config(…, true)`: for its own transaction).
    const encoding = sql`${sql.placeholder('encoding')}::text`;
    this.storePromptCountsStatement = db
      .update(prompts)
      .set({ tokens: sql`counted.tokens`, tokenEncoding: encoding })
      .from(sql`json_to_recordset(${sql.placeholder('counted')}::json) as counted(id uuid, "updatedAt" timestamptz, tokens integer)`)
      .where(
        and(
          eq(prompts.id, sql`counted.id`),
          eq(prompts.updatedAt, sql`counted."updatedAt"`),
          sql`(${prompts.tokens} is distinct from counted.tokens or ${prompts.tokenEncoding} is distinct from ${encoding})`,
        ),
      )
      .returning({ asyncCommit: sql`set_config('synchronous_commit', 'off', true)` })
      .prepare('chat_store_prompt_counts');
  }

  /**
   * Checks the token, ownership, the provider and the token budget, and builds the context, reading
   * everything in one statement (more only for a history longer than its first page); throws 401, 404,
   * 503 PROVIDER_NOT_CONFIGURED or 400 CONTEXT_TOO_LONG before any write or provider call. The route
   * is `tokenCheckedByHandler`. A turn with no `idempotencyKey` (which its caller claims after this, and
   * which may then replay the turn instead), when nothing else may refuse it after this, has the same
   * statement store a question of up to `PACED_TEXT` characters where that cannot be one of these
   * refusals (a round trip less); for a turn that will `stream`, the flush that makes it durable is sent
   * behind it (see `readTurn`). A keyed turn's question keeps its key (see `retireEarlierAttempts`).
   */
  async prepare(
    user: AuthUser,
    projectId: string,
    message: string,
    { idempotencyKey, stream, log }: { idempotencyKey?: string; stream: boolean; log: CallLog },
  ): Promise<PreparedTurn> {
    // The question as stored and read back: UTF-8 has no lone surrogates, which become U+FFFD on the way.
    const text = message.replace(LONE_SURROGATE, '\ufffd');
    // A question long enough to be counted in turns is counted once the read has found the project: a
    // refused turn (another's project, a stale token) costs no counting.
    const fast = idempotencyKey === undefined && text.length <= PACED_TEXT ? this.defaultTurn : undefined;
    const questionId = uuidv7();
    const defaultTokens = fast && countTokens(text, fast.model);
    // Before the read: a question marked failed after it is not to be cached with what it read.
    const cacheVersion = this.historyCache.version;
    const { row, durable } = await this.readTurn(Boolean(fast && stream), {
      userId: user.id,
      projectId: projectIdParam(projectId),
      tokenVersion: user.tokenVersion,
      questionId,
      text,
      tokens: defaultTokens ?? null,
      encoding: fast?.encoding ?? null,
      promptsRoom: fast ? fast.budget - MESSAGE_OVERHEAD_TOKENS - defaultTokens! : -1,
      defaultEncoding: this.defaultTurn?.encoding ?? null,
      promptsCap: this.defaultTurn ? this.defaultTurn.budget - MESSAGE_OVERHEAD_TOKENS - (defaultTokens ?? 0) : null,
    });
    assertTokenCurrent(user, row);
    if (!row?.projectId) throw new NotFound('Project');
    // As stored from here on: the path's may be in capitals.
    const ownedId = row.projectId;
    const { adapter, model } = this.providers.resolve(row.provider as ProviderName | null, row.model);
    const encoding = encodingName(model);
    const textTokens = fast && encoding === fast.encoding ? defaultTokens! : await countTokensPaced(text, model);
    const budget = this.budgetFor(model);
    if (!row.prompts) throw contextTooLong(row.storedPromptTokens + MESSAGE_OVERHEAD_TOKENS + textTokens, model, budget);
    const counted: PromptCount[] = [];
    const context = await buildContext({
      prompts: row.prompts,
      filesSection: (room) =>
        this.files.chatSection(row.files, {
          budget: room,
          countText: (content, limit) => countTokensPaced(content, model, limit),
          encoding,
          providerReadsFiles: adapter.supportsFiles,
        }),
      history: (room) => this.newestHistory(ownedId, { page: row.history, revision: row.historyRevision }, model, room, cacheVersion),
      newMessage: { content: text, tokens: textTokens },
      budget,
      promptTokens: (prompt) => this.promptTokens(prompt, model, encoding, counted),
    }).catch(async (error: unknown) => {
      // A file's bytes unreadable, a page of history the database failed to give, the question stored.
      throw row.questionStoredAt ? await this.failedBeforeTheCall({ projectId: ownedId, question: { id: questionId } }, durable, error) : error;
    });
    // Refused or not: the next turn that these prompts refuse is refused without reading them.
    await this.storePromptCounts(counted, encoding);
    // Never for a question stored by the read: what let it be stored counted the same at least as high.
    if (!context.fits) throw contextTooLong(context.requiredTokens, model, budget);
    const question = messageRow(ownedId, model, { role: 'user', content: text, status: 'complete', tokens: textTokens, idempotencyKey: idempotencyKey ?? null }, questionId);
    const { questionStoredAt } = row;
    const turnAdapter = this.files.turnAdapter(ownedId, adapter, context.messages.at(-1)!);
    const stored = questionStoredAt ? { questionStoredAt, durable } : { historyFrom: row.history[0]?.id };
    return { projectId: ownedId, adapter: turnAdapter, model, context: context.messages, question, log, ...stored };
  }

  /**
   * The turn's read, and with `flushBehind` the flush that makes a question it stored durable, on the
   * read's own connection: sent the moment the read is answered, it reaches the disk while the context
   * is built and the provider called, instead of after a round trip through the service. When the read
   * stored nothing (a refusal, a project of its own model), the flush finds no question and writes
   * nothing; such a turn stores its question later and flushes it then, as every other does.
   */
  private async readTurn(flushBehind: boolean, params: Record<string, unknown>): Promise<{ row: TurnRow | undefined; durable?: Promise<unknown> }> {
    if (!flushBehind) {
      const [row] = await this.statementsOn(this.database.db).read.execute(params);
      return { row };
    }
    const connection = await this.database.hold();
    const { read, flush } = this.statementsOn(connection.db);
    const rows = read.execute(params);
    const durable = flush.execute({ questionId: params.questionId });
    // Held until the flush is answered; a connection whose statement failed is closed, not reused.
    durable.then(
      () => connection.release(),
      (error: Error) => connection.release(error),
    );
    const [row] = await rows;
    return { row, durable };
  }

  private statementsOn(db: Db): TurnStatements {
    let statements = this.statements.get(db);
    if (!statements) this.statements.set(db, (statements = { read: turnStatementOn(db), flush: flushStatementOn(db), insertAnswer: answerStatementOn(db) }));
    return statements;
  }

  /**
   * A prompt's tokens in `model`'s encoding: as stored, or counted once per version of the prompt (see
   * `textTokens`) and added to `counted`, for the turn to store.
   */
  private async promptTokens(prompt: TurnPrompt, model: string, encoding: string, counted: PromptCount[]): Promise<number> {
    if (prompt.tokens !== null && prompt.encoding === encoding) return prompt.tokens;
    const tokens = await this.textTokens(`${prompt.id} ${prompt.updatedAt} ${prompt.content.length}`, prompt.content, model, encoding);
    counted.push({ id: prompt.id, updatedAt: prompt.updatedAt, tokens });
    return tokens;
  }

  /** Stores the counts a turn made, each with the version of its prompt that was counted (see `prompts.tokens`). */
  private async storePromptCounts(counted: PromptCount[], encoding: string): Promise<void> {
    if (counted.length === 0) return;
    await this.storePromptCountsStatement.execute({ counted: JSON.stringify(counted), encoding }).catch(() => {
      // The database failing now: a later turn counts them again, as this one did.
    });
  }

  /**
   * The tokens of a text that does not change under `key`, in `model`'s encoding: counted once and kept.
   * A long one is counted in turns (`countTokensPaced`), so that a project's long prompts, or a long
   * history under a model of another encoding, do not hold the event loop; while it is, the turns that
   * need it meanwhile wait for that count instead of each counting it again.
   */
  private textTokens(key: string, content: string, model: string, encoding: string): number | Promise<number> {
    const known = this.textCounts.get(key, encoding);
    if (known !== undefined) return known;
    const counted = countTokensPaced(content, model);
    this.textCounts.set(key, encoding, counted);
    if (typeof counted === 'number') return counted;
    return counted.then((tokens) => {
      // Unless dropped meanwhile: a count is kept only while it is among the latest.
      if (this.textCounts.get(key, encoding) === counted) this.textCounts.set(key, encoding, tokens);
      return tokens;
    });
  }

  private budgetFor(model: string): number {
    return budgetOf(model, this.config);
  }

  /**
   * A JSON turn: the user message is stored first and kept whatever happens. `interrupt` (server
   * shutdown) aborts the provider call; its reason, an ApiError, is then the failure. `keep` keeps the
   * result with the answer.
   */
  async complete(turn: PreparedTurn, interrupt: AbortSignal, keep?: KeepResult): Promise<ChatResult> {
    const userMessage = await this.storeQuestion(turn);
    const call = new CallDeadline(this.config.AI_TIMEOUT_MS, interrupt);
    let completion;
    try {
      completion = await turn.adapter.complete({
        model: turn.model,
        messages: turn.context,
        maxOutputTokens: this.config.AI_MAX_OUTPUT_TOKENS,
        signal: call.signal,
        deadline: call.deadline,
        log: turn.log,
      });
    } catch (error) {
      throw await this.failure(turn, userMessage, providerFailure(error, call.timedOut));
    } finally {
      call.end();
    }
    // Its durable commit makes the question durable too: nothing is acknowledged before both are. A store
    // that fails is the database's failure, answered as such, naming the question as a stream's does
    // once it is durable (its own commit flushed nothing).
    const result = await this.storeAnswer(turn, userMessage, completion, keep).catch(async (error: unknown) => {
      throw await this.failedAfterStoring(userMessage.id, undefined, error);
    });
    if (!result) throw await this.questionGone(turn);
    return result;
  }

  /**
   * A streamed turn. Deltas are passed on as they arrive. The deadline covers everything up to the
   * upstream's first chunk (retries included) and then each silence between its chunks, so a long answer
   * that keeps coming, or a long thought before it, is never cut. A client that leaves aborts the upstream
   * call; text received so far is kept as `incomplete`, as it is when the upstream breaks or `interrupt`
   * fires (server shutdown), whose reason, an ApiError, is then the failure; a reply whose text was over
   * by then (see `ReplyReader`) is whole, and stored so. `keep` keeps a complete result with the answer.
   */
  async stream(turn: PreparedTurn, observer: TurnObserver, clientGone: AbortSignal, interrupt: AbortSignal, keep?: KeepResult): Promise<StreamOutcome> {
    const userMessage = await this.storeQuestion(turn);
    // A client that left while the turn was prepared: nobody to answer, so no provider to call.
    if (clientGone.aborted) {
      await this.markFailed(turn);
      return { kind: 'client-gone' };
    }
    // Aborted by whichever comes first of the deadline, the client leaving and the interrupt.
    const call = new CallDeadline(this.config.AI_TIMEOUT_MS, clientGone, interrupt);
    const request: ChatRequest = {
      model: turn.model,
      messages: turn.context,
      maxOutputTokens: this.config.AI_MAX_OUTPUT_TOKENS,
      signal: call.signal,
      // What a retry's wait is held against: the deadline as first set (the timer moves, this does not).
      deadline: call.deadline,
      log: turn.log,
      // The deadline is for silences: each chunk with something in it starts it again, a reasoning
      // model's thinking as a delta does, and says the turn is alive.
      onProgress: () => {
        call.refresh();
        observer.progress?.();
      },
    };
    let text = '';
    // As the upstream names it (a dated version, the model a router chose): an answer cut short is stored
    // with it, as a whole one is, and not with the name asked for.
    let answeredBy = turn.model;
    const onDelta = (content: string, model: string) => {
      // The upstream has answered and no retry will send the context again: an open stream does not keep
      // it (the whole history, up to the model's window) until its last delta.
      if (!text) request.messages = turn.context = [];
      text += content;
      answeredBy = model;
      return observer.delta(content);
    };
    // The provider call starts while the question is made durable, which it must be before it is announced
    // (by the flush sent behind the turn's read, when there is one): a delta that comes first waits for it.
    const announced = (turn.durable ?? this.makeDurable(userMessage.id)).then(() => observer.userMessage(toMessageDto(userMessage)));
    let announcing = true;
    const reply = turn.adapter.stream(request, (content, model) => (announcing ? announced.then(() => onDelta(content, model)) : onDelta(content, model)));
    reply.catch(() => undefined); // a failure is met below, when it is awaited: it must not go unhandled meanwhile
    try {
      await announced;
      announcing = false;
    } catch (error) {
      call.abort();
      call.end();
      await reply.catch(() => undefined);
      throw error;
    }

    let end: ReplyEnd;
    try {
      end = await reply;
    } catch (error) {
      // The provider's failure (or the client's leaving): what came before it is kept.
      const kept = await this.storeIncomplete(turn, text, answeredBy);
      if (clientGone.aborted) return { kind: 'client-gone' };
      if (!kept) return { kind: 'failed', error: await this.questionGone(turn, TURN_FAILED_MEANWHILE) };
      return { kind: 'failed', error: naming(userMessage, providerFailure(error, call.timedOut)) };
    } finally {
      call.end();
    }
    // The provider is done with, and the reply whole: stored complete, with the usage the upstream
    // reported, even when its client left before its `done`, as a JSON turn's is. A store that fails
    // from here on is the database's failure, answered as such (the route names the question), not the provider's.
    const stored = this.storeAnswer(turn, userMessage, { content: text, ...end }, keep);
    if (clientGone.aborted) {
      // Nobody to tell that a retry took the key over, or that the history was cleared: the store left
      // the answer out as it does then.
      await stored.catch((error: unknown) => {
        if (!(error instanceof KeyTakenOver)) throw error;
      });
      return { kind: 'client-gone' };
    }
    const result = await stored;
    if (!result) return { kind: 'failed', error: await this.questionGone(turn) };
    return { kind: 'complete', result };
  }

  /**
   * The project's history from the newest message backwards, a page at a time, as far as `room` tokens
   * reach: first the page the turn's statement read and what the cache holds past it, then pages read
   * as needed. Stored token counts are used when they are in the model's encoding; any other message is
   * counted here. Each page ends where the room does, and what fitted is cached for the project's next
   * turn when it is more than the first page, with what it takes when every message carried its count.
   * A cached history with that total is not walked: only the oldest messages it drops are counted, so a
   * turn in a long conversation costs what is new in it, not the thousands of messages its window holds.
   */
  private async *newestHistory(
    projectId: string,
    { page: firstPage, revision }: { page: StoredHistoryMessage[]; revision: number },
    model: string,
    room: number,
    cacheVersion: number,
  ): AsyncGenerator<HistoryPage> {
    const encoding = encodingName(model);
    const full = (page: StoredHistoryMessage[], size: number) => page.length === HISTORY_PAGES[size];
    const known = full(firstPage, 0) ? this.historyCache.extend(projectId, firstPage, revision) : undefined;
    // Whether messages older than those read may exist: a short page that the budget did not cut was the oldest.
    let more = known ? !known.cached.complete : full(firstPage, 0);
    // What fitted, newest first, and what it takes while every message of it carried its count in `encoding`.
    let fitted: StoredHistoryMessage[] = [];
    let fittedTokens: number | undefined = 0;
    // Once a message does not fit, no older one goes in.
    let spent = false;
    // What of the cached history `fitted` ends with, when it was not walked.
    let continues: Continuation | undefined;
    const walk = async (page: StoredHistoryMessage[]): Promise<HistoryPage> => {
      const fits: HistoryMessage[] = [];
      const before = room;
      for (const message of page) {
        const counted = message.encoding === encoding && message.tokens !== null;
        const tokens = MESSAGE_OVERHEAD_TOKENS + (counted ? message.tokens! : await this.textTokens(message.id, message.content, model, encoding));
        if (tokens > room) {
          spent = true;
          break;
        }
        room -= tokens;
        fitted.push(message);
        if (fittedTokens !== undefined) fittedTokens = counted ? fittedTokens + tokens : undefined;
        // The stored message itself when it carries its count: one object for as long as it is cached.
        fits.push(counted ? (message as HistoryMessage) : { ...message, tokens: tokens - MESSAGE_OVERHEAD_TOKENS });
      }
      return { messages: fits, count: fits.length, tokens: before - room };
    };
    let page = known?.newer ?? firstPage;
    yield await walk(page);
    const cached = known?.cached;
    if (cached && !spent) {
      page = cached.messages;
      if (cached.tokens?.encoding === encoding) {
        // Every cached message carries its count: the oldest are dropped until the rest fit.
        let kept = page.length;
        let tokens = cached.tokens.total;
        while (tokens > room) tokens -= MESSAGE_OVERHEAD_TOKENS + page[--kept]!.tokens!;
        spent = kept < page.length;
        room -= tokens;
        continues = { cached, from: fitted.length, kept };
        // The window copied once, what no longer fits cut off its end in place (a `slice` first was a
        // second copy of the window's length; a loop of stores took five times a `concat`).
        fitted = fitted.concat(page);
        fitted.length -= page.length - kept;
        if (fittedTokens !== undefined) fittedTokens += tokens;
        yield { messages: page as HistoryMessage[], count: kept, tokens };
      } else {
        yield await walk(page);
      }
    }
    for (let size = 1; more && !spent; size = Math.min(size + 1, HISTORY_PAGES.length - 1)) {
      const before = page[page.length - 1]!.id;
      const [row] = await this.historyPageStatement.execute({ projectId, before, limit: HISTORY_PAGES[size], room, encoding });
      page = row!.page;
      more = full(page, size);
      yield await walk(page);
    }
    // Only once the pages are read and walked to their end (the reader takes them all): what a failure
    // cut short would be cached as all there is.
    if (fitted.length > HISTORY_PAGES[0]!) {
      const tokens = fittedTokens === undefined ? undefined : { encoding, total: fittedTokens };
      this.historyCache.remember(projectId, { messages: fitted, complete: !spent && !more, revision, tokens }, cacheVersion, continues);
    }
  }

  /**
   * The question is committed before the provider is called, but not flushed to disk: nothing is
   * acknowledged until a later durable commit (the answer's, or `makeDurable`) has flushed the log up
   * to and past it, which saves a turn one disk flush of the two.
   */
  private async storeQuestion(turn: PreparedTurn): Promise<MessageRow> {
    if (turn.questionStoredAt) return withFields(turn.question, { createdAt: turn.questionStoredAt });
    const [stored] = await this.insertQuestionStatement.execute(withFields(turn.question, { historyFrom: turn.historyFrom ?? null }));
    if (!stored) throw await this.questionGone(turn, 'nothing of it was stored');
    return withFields(turn.question, { createdAt: stored.createdAt });
  }

  /** Flushes the log past the stored question's commit with a durable commit of its own. */
  private async makeDurable(questionId: string): Promise<void> {
    await this.statementsOn(this.database.db).flush.execute({ questionId });
  }

  /**
   * A turn that failed before its provider call, its question stored by the read: it ends with no answer,
   * so its question is marked failed, as a provider's failure marks it (a question asked again then goes
   * upstream once). When the database cannot record that either, the question is kept as it is, named
   * once it is durable (`failedAfterStoring`).
   */
  private async failedBeforeTheCall(turn: TurnOfQuestion, durable: Promise<unknown> | undefined, error: unknown): Promise<unknown> {
    try {
      await this.markFailed(turn);
    } catch {
      return this.failedAfterStoring(turn.question.id, durable, error);
    }
    return new FailureNaming(error, { userMessageId: turn.question.id });
  }

  /**
   * A failure names the stored question, marked failed first, which makes it durable: naming it
   * acknowledges it. A question gone meanwhile (its history cleared, its project deleted) is not named:
   * the turn is answered as one whose answer found it gone.
   */
  private async failure(turn: PreparedTurn, question: MessageRow, error: ApiError): Promise<ApiError> {
    if (!(await this.markFailed(turn))) return this.questionGone(turn, TURN_FAILED_MEANWHILE);
    return naming(question, error);
  }

  /**
   * The turn's question marked `failed`, as its turn ends with no answer stored (the provider failed or
   * answered nothing, the client left first, a retry took its key over), so that later turns leave it
   * out of their context (see `historyPage`). The project's cached history is dropped, and so is what
   * turns reading it now would cache: a question marked after it was read, past the newest page, would
   * otherwise stay in it. Other instances' kept histories go at their next turn of the project, which
   * reads another revision of its history (see `turnStatementOn`). Whether the question was still stored
   * to be marked.
   */
  private async markFailed(turn: TurnOfQuestion): Promise<boolean> {
    const marked = await this.markFailedStatement.execute({ questionId: turn.question.id });
    this.historyCache.forget(turn.projectId);
    return marked.length > 0;
  }

  /**
   * Marks failed the question `content` that earlier attempts with the Idempotency-Key `key` stored in the
   * project, within the replay window (see `retireAttemptsStatement`): a turn that has just claimed the
   * key asks it again. A dropped or broken stream left its question `complete`, with the text
   * so far as an `incomplete` answer; sent on with the retry's, the model read the question twice. Their
   * answers stay stored and listed, and are left out of contexts with their questions (see
   * `pairAnswers`). Whether any was marked: the context read before the claim held it.
   */
  async retireEarlierAttempts(turn: PreparedTurn, key: string): Promise<boolean> {
    const { projectId } = turn;
    const marked = await this.retireAttemptsStatement.execute({ projectId, key, content: turn.question.content });
    if (marked.length === 0) return false;
    this.historyCache.forget(projectId);
    return true;
  }

  /**
   * A failure of the database's after the question was stored (preparing the turn, after the read that
   * stored it; storing the answer): the failure naming the question, once it is durable (by the flush
   * behind the read, or by one of its own), as any other failure names it; the failure alone when it
   * cannot be made durable, as nothing then acknowledges it.
   */
  private async failedAfterStoring(questionId: string, durable: Promise<unknown> | undefined, error: unknown): Promise<unknown> {
    try {
      await (durable ?? this.makeDurable(questionId));
    } catch {
      return error;
    }
    return new FailureNaming(error, { userMessageId: questionId });
  }

  /**
   * The answer the provider ended, and the turn's result, with `keep` in one transaction, so that an
   * answer is stored exactly when its key would replay it; undefined when its question is gone (see
   * `answerStatementOn`). An answer the upstream cut short (its output limit, its content filter) is
   * the turn's result all the same, stored as `incomplete`.
   */
  private async storeAnswer(
    turn: PreparedTurn,
    userMessage: MessageRow,
    { content, model, usage, cutShort }: ReplyEnd & { content: string },
    keep?: KeepResult,
  ): Promise<ChatResult | undefined> {
    // Counted before a transaction begins: it holds a connection until it ends.
    const reply = await this.countedReply(turn, content);
    const store = async (db: Db) => {
      const assistantMessage = await this.storeReply(turn, reply, cutShort ? 'incomplete' : 'complete', model, usage, db);
      return assistantMessage && { userMessage: toMessageDto(userMessage), assistantMessage: toMessageDto(assistantMessage), usage };
    };
    if (!keep) return store(this.database.db);
    return this.database
      .transaction(async (tx) => {
        const result = await store(tx);
        if (result) await keep(tx, result);
        return result;
      })
      .catch(async (error: unknown) => {
        // The retry that took the key over asks the question again and keeps its own answer: this
        // question is left without one.
        if (error instanceof KeyTakenOver) await this.markFailed(turn);
        throw error;
      });
  }

  /**
   * What the provider sent before it failed or the client left, kept as `incomplete`; when it sent
   * nothing, the question is failed. Whether the question was still stored to keep it with.
   */
  private async storeIncomplete(turn: PreparedTurn, text: string, model: string): Promise<boolean> {
    if (text) return (await this.storeReply(turn, await this.countedReply(turn, text), 'incomplete', model, null)) !== undefined;
    return this.markFailed(turn);
  }

  /** The reply with its tokens, counted once here in the turn's model's encoding so that no later turn counts it again. */
  private async countedReply(turn: PreparedTurn, content: string): Promise<CountedReply> {
    return { content, tokens: await countTokensPaced(content, turn.model) };
  }

  private storeReply(turn: PreparedTurn, { content, tokens }: CountedReply, status: 'complete' | 'incomplete', model: string, usage: Usage | null, db = this.database.db) {
    return this.store(db, turn, {
      role: 'assistant',
      content,
      status,
      model,
      promptTokens: usage?.promptTokens ?? null,
      completionTokens: usage?.completionTokens ?? null,
      totalTokens: usage?.totalTokens ?? null,
      tokens,
    });
  }

  /** The answer, unless its question is gone (see `answerStatementOn`): then nothing is stored. */
  private async store(db: Db, turn: PreparedTurn, message: NewMessage): Promise<MessageRow | undefined> {
    const [row] = await this.statementsOn(db).insertAnswer.execute(withFields(messageRow(turn.projectId, turn.model, message), { questionId: turn.question.id }));
    return row;
  }

  /** Why a turn's message was not stored: its project was deleted during the turn (404), or only its history cleared. */
  private async questionGone(turn: PreparedTurn, when = 'its answer was not stored'): Promise<ApiError> {
    const [project] = await this.database.db.select({ id: projects.id }).from(projects).where(eq(projects.id, turn.projectId));
    if (!project) return new NotFound('Project');
    return new Conflict(`The history was cleared during the turn: ${when}`);
  }
}

/** What `questionGone` says of a turn that failed (the provider, the client) after its question was taken. */
const TURN_FAILED_MEANWHILE = 'nothing of it is kept';

type BudgetConfig = Pick<Config, 'AI_CONTEXT_TOKENS' | 'AI_MAX_OUTPUT_TOKENS'>;

/** A turn refused because its prompts and question alone need `requiredTokens` or more, past `budget`. */
function contextTooLong(requiredTokens: number, model: string, budget: number): ApiError {
  return new ApiError(400, 'CONTEXT_TOO_LONG', `The prompts and the message need at least ${requiredTokens} tokens; the budget for ${model} is ${Math.max(budget, 0)}`);
}

/**
 * The tokens a request for `model` may take: its context window less what is kept for the reply. The
 * window is AI_CONTEXT_TOKENS where the model's own is not known, and never more than its own where it is:
 * set for the default model (a local server's), AI_CONTEXT_TOKENS sent a project's `gpt-4` (8,192) more
 * than it takes, and each such turn was refused upstream.
 */
function budgetOf(model: string, config: BudgetConfig): number {
  const known = contextWindow(model);
  const window = known === undefined ? (config.AI_CONTEXT_TOKENS ?? DEFAULT_CONTEXT_TOKENS) : Math.min(known, config.AI_CONTEXT_TOKENS ?? known);
  return window - config.AI_MAX_OUTPUT_TOKENS - REPLY_PRIMING_TOKENS;
}

/**
 * Refuses, as the configuration refuses an AI_CONTEXT_TOKENS too small, an AI_MAX_OUTPUT_TOKENS that
 * leaves the default model's own window no room for a message: the service started, and every chat was
 * 400 CONTEXT_TOO_LONG, blaming its message.
 */
export function requireRoomForAMessage(config: BudgetConfig, defaultModel: string): void {
  const budget = budgetOf(defaultModel, config);
  if (budget >= MESSAGE_OVERHEAD_TOKENS + 1) return;
  const window = budget + config.AI_MAX_OUTPUT_TOKENS + REPLY_PRIMING_TOKENS;
  throw new ConfigError(
    `Invalid configuration: AI_MAX_OUTPUT_TOKENS (${config.AI_MAX_OUTPUT_TOKENS}) leaves no room for a message in the ${window} tokens of ${defaultModel}'s context (the model's known window, at most AI_CONTEXT_TOKENS; else AI_CONTEXT_TOKENS, else ${DEFAULT_CONTEXT_TOKENS})`,
  );
}

/** A message of the project as it is stored: the fields given, null for the others, its tokens in the model's encoding. */
function messageRow(projectId: string, model: string, message: NewMessage, id = uuidv7()): UnstampedMessage {
  return {
    model: null,
    promptTokens: null,
    completionTokens: null,
    totalTokens: null,
    replyTo: null,
    idempotencyKey: null,
    ...message,
    id,
    projectId,
    tokenEncoding: encodingName(model),
  };
}

/** The provider error a failed call answers with: the deadline's own, or what the adapter threw. */
function providerFailure(error: unknown, timedOut: boolean): ApiError {
  if (timedOut) return new ProviderTimeout();
  if (error instanceof ApiError) return error;
  return new ProviderError();
}

/** Failures after the user message was stored name it, so that the client can find it. */
function naming(userMessage: MessageRow, error: ApiError): ApiError {
  Object.assign(error.extensions, { userMessageId: userMessage.id });
  return error;
}
