import { and, asc, desc, eq, sql } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import type { Config } from '../../config.js';
import type { Db } from '../../db/database.js';
import { messages, prompts } from '../../db/schema.js';
import { ApiError } from '../../http/errors.js';
import { contextWindow, countTokens, MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS } from '../../providers/models.js';
import type { ProviderRegistry } from '../../providers/registry.js';
import {
  type ChatMessage,
  type ProviderAdapter,
  ProviderError,
  ProviderTimeout,
  type Usage,
} from '../../providers/types.js';
import type { FilesService } from '../files/service.js';
import { type MessageDto, type MessageRow, toMessageDto } from '../messages/schemas.js';
import { requireOwnedProject } from '../projects/service.js';
import { buildContext, type HistoryMessage } from './context.js';
import type { ChatResult } from './schemas.js';

/** Models we know nothing about get this context window, as the contract says. */
const DEFAULT_CONTEXT_TOKENS = 16_000;
/** History is read from the newest end in pages of this many rows, only as far as the budget reaches. */
const HISTORY_PAGE = 64;

/** Everything a turn needs, settled before anything is stored: a rejected turn leaves no trace. */
export interface PreparedTurn {
  projectId: string;
  adapter: ProviderAdapter;
  model: string;
  context: ChatMessage[];
  text: string;
}

/** What the streaming path tells its caller as the turn goes on. */
export interface TurnObserver {
  userMessage(message: MessageDto): Promise<void>;
  delta(content: string): Promise<void>;
}

export type StreamOutcome =
  | { kind: 'complete'; result: ChatResult }
  /** The provider failed or was cut off; `error` names the stored user message. */
  | { kind: 'failed'; error: ApiError }
  | { kind: 'client-gone' };

type NewMessage = Pick<MessageRow, 'role' | 'content' | 'status'> &
  Partial<Pick<MessageRow, 'model' | 'promptTokens' | 'completionTokens' | 'totalTokens'>>;

export class ChatService {
  constructor(
    private readonly db: Db,
    private readonly providers: ProviderRegistry,
    private readonly files: FilesService,
    private readonly config: Pick<Config, 'AI_CONTEXT_TOKENS' | 'AI_MAX_OUTPUT_TOKENS' | 'AI_TIMEOUT_MS'>,
  ) {}

  /**
   * Checks ownership, the provider and the token budget, and builds the context; throws 404, 503
   * PROVIDER_NOT_CONFIGURED or 400 CONTEXT_TOO_LONG before any write or provider call.
   */
  async prepare(userId: string, projectId: string, text: string): Promise<PreparedTurn> {
    const project = await requireOwnedProject(this.db, userId, projectId);
    const { adapter, model } = this.providers.resolve(project.provider, project.model);
    const promptRows = await this.db
      .select({ content: prompts.content })
      .from(prompts)
      .where(eq(prompts.projectId, projectId))
      .orderBy(asc(prompts.id));
    const window = this.config.AI_CONTEXT_TOKENS ?? contextWindow(model) ?? DEFAULT_CONTEXT_TOKENS;
    const budget = window - this.config.AI_MAX_OUTPUT_TOKENS - REPLY_PRIMING_TOKENS;
    const context = await buildContext({
      prompts: promptRows.map((row) => row.content),
      filesSection: (room) =>
        this.files.chatSection(projectId, {
          budget: room,
          countText: (content) => countTokens(content, model),
          providerReadsFiles: adapter.supportsFiles,
        }),
      history: this.newestHistory(projectId),
      newMessage: text,
      budget,
      countTokens: (message) => countTokens(message.content, model) + MESSAGE_OVERHEAD_TOKENS,
    });
    if (!context.fits) {
      throw new ApiError(
        400,
        'CONTEXT_TOO_LONG',
        `The prompts and the message need ${context.requiredTokens} tokens; the budget for ${model} is ${Math.max(budget, 0)}`,
      );
    }
    return { projectId, adapter, model, context: context.messages, text };
  }

  /**
   * A JSON turn: the user message is stored first and kept whatever happens. `interrupt` (server
   * shutdown) aborts the provider call; its reason, an ApiError, is then the failure.
   */
  async complete(turn: PreparedTurn, interrupt: AbortSignal): Promise<ChatResult> {
    const userMessage = await this.store(turn.projectId, { role: 'user', content: turn.text, status: 'complete' });
    const deadline = AbortSignal.timeout(this.config.AI_TIMEOUT_MS);
    let completion;
    try {
      completion = await turn.adapter.complete({
        model: turn.model,
        messages: turn.context,
        maxOutputTokens: this.config.AI_MAX_OUTPUT_TOKENS,
        signal: AbortSignal.any([deadline, interrupt]),
        deadline: Date.now() + this.config.AI_TIMEOUT_MS,
      });
    } catch (error) {
      throw naming(userMessage, providerFailure(error, deadline));
    }
    if (!completion.content) throw naming(userMessage, new ProviderError('The AI provider answered with no content'));
    const assistantMessage = await this.storeReply(turn.projectId, completion.content, 'complete', completion.model, completion.usage);
    return { userMessage: toMessageDto(userMessage), assistantMessage: toMessageDto(assistantMessage), usage: completion.usage };
  }

  /**
   * A streamed turn. Deltas are passed on as they arrive. The deadline covers everything up to the first
   * delta (retries included) and then each silence between deltas, so a long answer that keeps coming
   * is never cut. A client that leaves aborts the upstream call; text received so far is kept as
   * `incomplete`, as it is when the upstream breaks or `interrupt` fires (server shutdown), whose
   * reason, an ApiError, is then the failure.
   */
  async stream(turn: PreparedTurn, observer: TurnObserver, clientGone: AbortSignal, interrupt: AbortSignal): Promise<StreamOutcome> {
    const userMessage = await this.store(turn.projectId, { role: 'user', content: turn.text, status: 'complete' });
    await observer.userMessage(toMessageDto(userMessage));

    const deadline = new AbortController();
    const expire = () => deadline.abort(new DOMException('The chat deadline passed', 'TimeoutError'));
    let timer = setTimeout(expire, this.config.AI_TIMEOUT_MS);
    const signal = AbortSignal.any([deadline.signal, clientGone, interrupt]);
    let text = '';
    try {
      let done: { model: string; usage: Usage | null } | undefined;
      for await (const event of turn.adapter.stream({
        model: turn.model,
        messages: turn.context,
        maxOutputTokens: this.config.AI_MAX_OUTPUT_TOKENS,
        signal,
        // Retries happen only before the first delta, so this bounds them all.
        deadline: Date.now() + this.config.AI_TIMEOUT_MS,
      })) {
        if (event.type === 'done') {
          done = event;
          continue;
        }
        clearTimeout(timer);
        timer = setTimeout(expire, this.config.AI_TIMEOUT_MS);
        text += event.content;
        await observer.delta(event.content);
        if (clientGone.aborted) break;
      }
      if (clientGone.aborted) {
        if (text) await this.storeReply(turn.projectId, text, 'incomplete', turn.model, null);
        return { kind: 'client-gone' };
      }
      if (!text) return { kind: 'failed', error: naming(userMessage, new ProviderError('The AI provider answered with no content')) };
      const assistantMessage = await this.storeReply(turn.projectId, text, 'complete', done?.model ?? turn.model, done?.usage ?? null);
      const result = { userMessage: toMessageDto(userMessage), assistantMessage: toMessageDto(assistantMessage), usage: done?.usage ?? null };
      return { kind: 'complete', result };
    } catch (error) {
      if (text) await this.storeReply(turn.projectId, text, 'incomplete', turn.model, null);
      if (clientGone.aborted) return { kind: 'client-gone' };
      return { kind: 'failed', error: naming(userMessage, providerFailure(error, deadline.signal)) };
    } finally {
      clearTimeout(timer);
    }
  }

  /** The project's history from the newest message backwards, a page at a time, as long as it is read. */
  private async *newestHistory(projectId: string): AsyncGenerator<HistoryMessage> {
    let before: string | undefined;
    for (;;) {
      const page = await this.db
        .select({ id: messages.id, role: messages.role, content: messages.content })
        .from(messages)
        .where(
          and(
            eq(messages.projectId, projectId),
            // Keyset on the index order, against the stored row itself (its timestamp has microseconds).
            before === undefined
              ? undefined
              : sql`(${messages.createdAt}, ${messages.id}) < (select m.created_at, m.id from ${messages} m where m.id = ${before})`,
          ),
        )
        .orderBy(desc(messages.createdAt), desc(messages.id))
        .limit(HISTORY_PAGE);
      yield* page;
      if (page.length < HISTORY_PAGE) return;
      before = page[page.length - 1]!.id;
    }
  }

  private storeReply(projectId: string, content: string, status: 'complete' | 'incomplete', model: string, usage: Usage | null) {
    return this.store(projectId, {
      role: 'assistant',
      content,
      status,
      model,
      promptTokens: usage?.promptTokens ?? null,
      completionTokens: usage?.completionTokens ?? null,
      totalTokens: usage?.totalTokens ?? null,
    });
  }

  private async store(projectId: string, message: NewMessage): Promise<MessageRow> {
    const [row] = await this.db
      .insert(messages)
      .values({ id: uuidv7(), projectId, createdAt: new Date(), ...message })
      .returning();
    return row!;
  }
}

/** The provider error a failed call answers with: the deadline's own, or what the adapter threw. */
function providerFailure(error: unknown, deadline: AbortSignal): ApiError {
  if (deadline.aborted) return new ProviderTimeout();
  if (error instanceof ApiError) return error;
  return new ProviderError();
}

/** Failures after the user message was stored name it, so that the client can find it. */
function naming(userMessage: MessageRow, error: ApiError): ApiError {
  Object.assign(error.extensions, { userMessageId: userMessage.id });
  return error;
}
