import type { ChatCompletion, ChatRequest, DeltaSink, ProviderAdapter, ProviderName, ReplyEnd } from '../../providers/types.js';
import { EmptyAnswer, ProviderError } from '../../providers/types.js';

/**
 * A turn's adapter for a new message that names provider files (PDFs sent by reference). A file
 * deleted while the turn waits on the provider (a retry's wait, a slow answer) has its copy deleted
 * upstream at once, and the provider then refuses the request that names it: the turn failed for a
 * file its user had just taken away. A call refused before any answer while some of its files are no
 * longer named by a file row is made once more without those, and the turn answers without them.
 */
export class ForgettingDeletedCopies implements ProviderAdapter {
  readonly name: ProviderName;
  readonly supportsFiles: boolean;

  constructor(
    private readonly inner: ProviderAdapter,
    /** Of the given provider files, those a file row still names. */
    private readonly stillNamed: (providerFileIds: string[]) => Promise<string[]>,
  ) {
    this.name = inner.name;
    this.supportsFiles = inner.supportsFiles;
  }

  async complete(request: ChatRequest): Promise<ChatCompletion> {
    try {
      return await this.inner.complete(request);
    } catch (error) {
      const again = await this.withoutDeleted(request, error);
      if (!again) throw error;
      return this.inner.complete(again);
    }
  }

  async stream(request: ChatRequest, onDelta: DeltaSink): Promise<ReplyEnd> {
    let answered = false;
    try {
      return await this.inner.stream(request, (content, model) => {
        answered = true;
        return onDelta(content, model);
      });
    } catch (error) {
      const again = answered ? undefined : await this.withoutDeleted(request, error);
      if (!again) throw error;
      return this.inner.stream(again, onDelta);
    }
  }

  /** The request without its files deleted since, when `error` may be the provider refusing them; else undefined. */
  private async withoutDeleted(request: ChatRequest, error: unknown): Promise<ChatRequest | undefined> {
    const question = request.messages.at(-1);
    // An answer of no text was an answer: the files were not refused.
    if (!(error instanceof ProviderError) || error instanceof EmptyAnswer || !question?.fileIds?.length || request.signal.aborted) return undefined;
    const named = question.fileIds;
    // A check that fails leaves the provider's own error to answer with.
    const kept = new Set(await this.stillNamed(named).catch(() => named));
    if (kept.size === named.length) return undefined;
    const fileIds = named.filter((id) => kept.has(id));
    return { ...request, messages: [...request.messages.slice(0, -1), { ...question, fileIds }] };
  }
}
