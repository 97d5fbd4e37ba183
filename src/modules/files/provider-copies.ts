import { and, inArray, lte, not, sql } from 'drizzle-orm';
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../../config.js';
import type { Db } from '../../db/database.js';
import { files, providerFileDeletions } from '../../db/schema.js';
import { CallDeadline, within } from '../../providers/abort.js';
import type { ProviderRegistry } from '../../providers/registry.js';
import { type CallBounds, type ProviderAdapter, type ProviderName, ProviderRateLimited, ProviderRefusedDeletion } from '../../providers/types.js';

/**
 * Only OpenAI has a Files API among the providers, so every provider file id is OpenAI's; a second
 * provider with one would need a column saying which provider holds a file.
 */
const FILES_PROVIDER: ProviderName = 'openai';

/** How long a copy queued when it was made waits for its row before it is deleted (see `reserve`). */
const UNNAMED_COPY_WAIT = '1 day';

/** A queued copy that a file row names: never deleted upstream. */
const namedByARow = sql`exists (select 1 from ${files} where ${files.providerFileId} = ${providerFileDeletions.providerFileId})`;

/** Provider copies deleted at once: many files go faster, without a flood of requests. */
const DELETES_AT_ONCE = 8;
/** Queued copies one claim takes at most. */
const CLAIM_BATCH = 64;
/** The wait before a copy's next try: 30 s, doubling with each try, 6 h at most. */
const RETRY_BASE_SECONDS = 30;
const RETRY_MAX_SECONDS = 6 * 60 * 60;

/**
 * The deletion of provider copies of deleted files, from the queue that the deletion of their rows
 * fills (`provider_file_deletions`). A copy is claimed before its provider is called: the claim counts
 * the try and pushes the copy's next one past a wait that doubles each time, so another instance (or
 * a sweep beside a request) never calls for it at once too, and a crash mid-call leaves it to be tried
 * again after that wait. Deleted upstream (or already gone there), or refused there for good, it
 * leaves the queue.
 */
export class ProviderCopies {
  constructor(
    private readonly db: Db,
    private readonly providers: ProviderRegistry,
    private readonly config: Pick<Config, 'AI_TIMEOUT_MS'>,
  ) {}

  /**
   * Queues a copy just made, due a day later, before the row that names it is written: should the row
   * never be (a crash, the database lost with the insert in flight), the copy is deleted then. The insert
   * that writes the row takes it out of the queue (a trigger, migration 0017).
   */
  async reserve(providerFileId: string): Promise<void> {
    await this.db
      .insert(providerFileDeletions)
      .values({ providerFileId, dueAt: sql`now() + interval '${sql.raw(UNNAMED_COPY_WAIT)}'` })
      .onConflictDoNothing();
  }

  /**
   * Deletes the copy of a file whose row was not written (an upload that failed after making it): due
   * at once in the queue, as a deleted file's is, so that a failure now is tried again. Never fails. A
   * copy that cannot even be queued (the database failing) is deleted all the same, logged if that
   * fails too.
   */
  async discardUnnamed(providerFileId: string, log: FastifyBaseLogger): Promise<void> {
    try {
      await this.db.insert(providerFileDeletions).values({ providerFileId }).onConflictDoUpdate({ target: providerFileDeletions.providerFileId, set: { dueAt: sql`now()` } });
    } catch (error) {
      const deleted = await this.filesApi()
        ?.deleteFile(providerFileId, within(this.config.AI_TIMEOUT_MS))
        .then(() => true, () => false);
      if (!deleted) log.warn({ err: error, provider: FILES_PROVIDER, providerFileId }, 'provider file copy not deleted');
      return;
    }
    await this.deleteNow([providerFileId], log);
  }

  /**
   * Deletes the queued copies `providerFileIds`, those just deleted with their rows, within one
   * AI_TIMEOUT_MS: a provider that does not answer holds the deletion that long once, not once a
   * file. Never fails: the rows' deletion has committed, and whatever is not deleted now (the provider
   * failing, the deadline, the database lost meanwhile) stays queued for `deleteDue`, logged.
   */
  async deleteNow(providerFileIds: string[], log: FastifyBaseLogger): Promise<void> {
    if (!providerFileIds.length) return;
    const adapter = this.filesApi();
    if (!adapter) {
      log.warn({ provider: FILES_PROVIDER, providerFileIds }, 'provider file copies left queued: the provider is not configured with its Files API');
      return;
    }
    try {
      const bounds = within(this.config.AI_TIMEOUT_MS);
      let rateLimited = false;
      for (let start = 0; start < providerFileIds.length && !bounds.signal.aborted && !rateLimited; start += CLAIM_BATCH) {
        ({ rateLimited } = await this.deleteClaimed(adapter, await this.claim(providerFileIds.slice(start, start + CLAIM_BATCH)), bounds, log));
      }
    } catch (error) {
      log.warn({ err: error, provider: FILES_PROVIDER, providerFileIds }, 'provider file copies left queued');
    }
  }

  /**
   * Deletes every queued copy whose time has come, a batch at a time, each batch within AI_TIMEOUT_MS,
   * until `closing` aborts, which also cuts the provider calls in flight short, or the provider asks to
   * slow down: the retries of copies a provider failed to delete, and what a crash or a deadline left.
   * Resolves with how many were deleted.
   */
  async deleteDue(closing: AbortSignal, log: FastifyBaseLogger): Promise<number> {
    const adapter = this.filesApi();
    if (!adapter) return 0;
    let deleted = 0;
    while (!closing.aborted) {
      const claimed = await this.claim();
      if (!claimed.length) break;
      // Not `AbortSignal.any` with `closing`: each batch's would stay listed on it as long as it lives.
      const call = new CallDeadline(this.config.AI_TIMEOUT_MS, closing);
      const batch = await this.deleteClaimed(adapter, claimed, call, log).finally(() => call.end());
      deleted += batch.deleted;
      if (batch.rateLimited) break;
    }
    return deleted;
  }

  /**
   * The adapter that deletes the copies: OpenAI's own. One pointed elsewhere (`AI_BASE_URL`) makes no
   * copies, and would answer 404 for OpenAI's, which would count as deleted; its copies wait instead.
   */
  private filesApi(): Required<Pick<ProviderAdapter, 'deleteFile'>> | undefined {
    const adapter = this.providers.get(FILES_PROVIDER);
    return adapter?.supportsFiles && adapter.deleteFile ? { deleteFile: adapter.deleteFile } : undefined;
  }

  /**
   * Claims due copies, those of `only` when given: their try is counted and their next one put off,
   * past the try's own deadline at least, so that no other claim calls for them while it runs.
   */
  private async claim(only?: string[]): Promise<string[]> {
    const { providerFileId, attempts, dueAt } = providerFileDeletions;
    const due = this.db
      .select({ providerFileId })
      .from(providerFileDeletions)
      .where(and(lte(dueAt, sql`now()`), only && inArray(providerFileId, only), not(namedByARow)))
      .orderBy(dueAt)
      .limit(CLAIM_BATCH)
      .for('update', { skipLocked: true });
    const deadlineSeconds = Math.ceil(this.config.AI_TIMEOUT_MS / 1000);
    const claimed = await this.db
      .update(providerFileDeletions)
      .set({
        attempts: sql`${attempts} + 1`,
        dueAt: sql`now() + make_interval(secs => greatest(${deadlineSeconds}, least(${RETRY_BASE_SECONDS} * power(2, least(${attempts}, 16)), ${RETRY_MAX_SECONDS})))`,
      })
      .where(inArray(providerFileId, due))
      .returning({ providerFileId });
    return claimed.map((row) => row.providerFileId);
  }

  /**
   * Deletes claimed copies upstream, DELETES_AT_ONCE at a time, and from the queue those deleted or
   * refused for good; resolves with how many were deleted, and whether the provider rate-limited a
   * deletion past its retries or its deadline (`rateLimited`). Then no other copy is tried: one call a
   * copy would go on asking a provider that said to wait, and those not tried keep the wait of their
   * claim (their try not counted). Those not tried before the bounds' signal aborts are handed back, due
   * at once, their try not counted.
   */
  private async deleteClaimed(
    adapter: Required<Pick<ProviderAdapter, 'deleteFile'>>,
    providerFileIds: string[],
    bounds: CallBounds,
    log: FastifyBaseLogger,
  ): Promise<{ deleted: number; rateLimited: boolean }> {
    const { signal } = bounds;
    const left = [...providerFileIds];
    const done: string[] = [];
    const refused: string[] = [];
    let rateLimited = false;
    const worker = async () => {
      for (let providerFileId = left.shift(); providerFileId; providerFileId = signal.aborted || rateLimited ? undefined : left.shift()) {
        try {
          await adapter.deleteFile(providerFileId, bounds);
          done.push(providerFileId);
        } catch (error) {
          if (error instanceof ProviderRefusedDeletion) {
            // Tried again every 6 h, it would be refused forever: said once, for an operator to see to
            // (without the provider's own text, which may name the account).
            log.warn({ provider: FILES_PROVIDER, providerFileId, status: error.upstreamStatus }, 'provider file copy refused for good; no longer tried');
            refused.push(providerFileId);
          } else {
            if (error instanceof ProviderRateLimited) rateLimited = true;
            log.warn({ err: error, provider: FILES_PROVIDER, providerFileId }, 'provider file copy not deleted');
          }
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(DELETES_AT_ONCE, left.length) }, worker));
    const { providerFileId, attempts } = providerFileDeletions;
    const leaving = [...done, ...refused];
    if (leaving.length) await this.db.delete(providerFileDeletions).where(inArray(providerFileId, leaving));
    if (left.length) {
      // Due at once, unless the provider said to wait: then each keeps its claim's wait.
      await this.db
        .update(providerFileDeletions)
        .set({ attempts: sql`${attempts} - 1`, ...(!rateLimited && { dueAt: sql`now()` }) })
        .where(inArray(providerFileId, left));
    }
    return { deleted: done.length, rateLimited };
  }
}
