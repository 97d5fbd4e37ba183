import { createHash, randomUUID } from 'node:crypto';
import { and, eq, not, or, sql } from 'drizzle-orm';
import type { Db } from '../../db/database.js';
import { idempotencyKeys } from '../../db/schema.js';
import { ApiError } from '../../http/errors.js';

/** How long a completed request's result is replayed; within it, a key claimed again belongs to an attempt that did not complete. */
export const REPLAY_WINDOW = '24 hours';
/** Keys one statement of `sweep` deletes at most: each batch is quick and locks few rows. */
const SWEEP_BATCH = 1_000;

/**
 * `claimId` names this hold of the key: once the key is taken over (its holder fell silent), the holder it
 * was taken from may no longer complete, release or keep alive what is now another request's.
 */
export type IdempotencyClaim<T> = { kind: 'claimed'; claimId: string } | { kind: 'replay'; response: T };

/**
 * When a retry of a request still running may ask again (Retry-After, seconds): most turns end within
 * seconds (a reply streams for a few), and the answer is then replayed; a client on a flaky network had
 * no hint, and retried at once or gave up.
 */
export const IN_PROGRESS_RETRY_AFTER_SECONDS = 2;

const inProgress = () =>
  new ApiError(409, 'IDEMPOTENCY_CONFLICT', 'A request with this Idempotency-Key is still in progress', {}, { 'retry-after': String(IN_PROGRESS_RETRY_AFTER_SECONDS) });

/** A turn whose key a retry took over while it ran (see `IdempotencyStore.complete`): its answer is not kept, the retry's is. */
export class KeyTakenOver extends ApiError {
  constructor() {
    super(409, 'IDEMPOTENCY_CONFLICT', 'A retry with this Idempotency-Key took it over while this request ran: its answer is the one kept');
  }
}

/** Identifies a request by what it asks: the same key with another hash is a different request. */
export function requestHash(parts: unknown): string {
  return createHash('sha256').update(JSON.stringify(parts)).digest('base64url');
}

/** A running key says it is alive this many times within the time after which it would be stale. */
const BEATS_PER_STALE = 4;

/** What a request holding a key tells the store while it runs (see `IdempotencyStore.keepAlive`). */
export interface KeyHold {
  /** The request got somewhere (a stream, a delta to its client): the next beat says it is alive. */
  progressed(): void;
  stop(): void;
}

/**
 * Idempotency keys in PostgreSQL, so they hold across restarts and instances. A key is claimed by one
 * request at a time; its finished result is replayed for 24 h. A key left running by an instance that
 * died is taken over once it has said nothing for `staleAfterMs`: no JSON turn runs that long, and a
 * stream says it is alive (`keepAlive`) as long as its deltas reach its client.
 */
export class IdempotencyStore<T> {
  constructor(
    private readonly db: Db,
    private readonly staleAfterMs: number,
  ) {}

  /** A key first claimed longer ago than it is replayed. */
  private readonly expired = sql`${idempotencyKeys.createdAt} < now() - interval '${sql.raw(REPLAY_WINDOW)}'`;

  /**
   * A running key that has said nothing for `staleAfterMs`: its request is gone (or no longer heard from).
   * `created_at` too: an instance of the code before `alive_at` takes a key over by it alone.
   */
  private get stale() {
    const silentSince = sql`now() - make_interval(secs => ${this.staleAfterMs / 1000})`;
    return sql`${idempotencyKeys.state} = 'running' and greatest(${idempotencyKeys.createdAt}, ${idempotencyKeys.aliveAt}) < ${silentSince}`;
  }

  /**
   * Claims the key for a turn of the project `projectId`, checked as the user's first: the result kept
   * for replay goes with the project (deleted with it, and with its cleared history). A project deleted
   * since is a foreign key's violation, answered 404 as every write under a deleted parent is.
   */
  async claim(userId: string, projectId: string, key: string, hash: string): Promise<IdempotencyClaim<T>> {
    const claimId = randomUUID();
    const claimed = await this.db
      .insert(idempotencyKeys)
      .values({ userId, projectId, key, requestHash: hash, state: 'running', claimId })
      .onConflictDoUpdate({
        target: [idempotencyKeys.userId, idempotencyKeys.key],
        set: { projectId, requestHash: hash, state: 'running', response: null, createdAt: sql`now()`, aliveAt: sql`now()`, claimId },
        // A key past its replay window once its request is done; a running one only once it is stale,
        // however old: a stream may run past the window as long as its deltas reach its client.
        setWhere: or(and(this.expired, eq(idempotencyKeys.state, 'done')), this.stale),
      })
      .returning({ key: idempotencyKeys.key });
    if (claimed.length) return { kind: 'claimed', claimId };

    const [existing] = await this.db
      .select()
      .from(idempotencyKeys)
      .where(and(eq(idempotencyKeys.userId, userId), eq(idempotencyKeys.key, key)));
    // Released between the two statements: the caller may simply try again.
    if (!existing) return this.claim(userId, projectId, key, hash);
    if (existing.requestHash !== hash) {
      throw new ApiError(422, 'IDEMPOTENCY_MISMATCH', 'This Idempotency-Key was used with a different request');
    }
    if (existing.state === 'running') throw inProgress();
    return { kind: 'replay', response: existing.response as T };
  }

  /**
   * What a retry of the key's request `hash` is owed when it may not claim the key (a new turn would be
   * refused): the result kept when that request completed within the replay window; IDEMPOTENCY_CONFLICT
   * while it still runs and is heard from, as `claim` answers; undefined otherwise. Claims nothing.
   */
  async replay(userId: string, key: string, hash: string): Promise<T | undefined> {
    const [found] = await this.db
      .select({ response: idempotencyKeys.response, running: sql<boolean>`${idempotencyKeys.state} = 'running' and not (${this.stale})` })
      .from(idempotencyKeys)
      .where(
        and(
          eq(idempotencyKeys.userId, userId),
          eq(idempotencyKeys.key, key),
          eq(idempotencyKeys.requestHash, hash),
          or(and(eq(idempotencyKeys.state, 'done'), not(this.expired)), eq(idempotencyKeys.state, 'running')),
        ),
      );
    if (found?.running) throw inProgress();
    return (found?.response ?? undefined) as T | undefined;
  }

  /**
   * Until `stop`, says the request holding the key is alive whenever it has `progressed` since it last
   * said so: a stream whose client stopped reading, stuck on its next write, falls silent. A beat that
   * fails is not retried: the next one may get through, and at worst the key is taken over.
   */
  keepAlive(userId: string, key: string, claimId: string): KeyHold {
    let progressed = false;
    const beat = setInterval(() => {
      if (!progressed) return;
      progressed = false;
      this.db
        .update(idempotencyKeys)
        .set({ aliveAt: sql`now()` })
        .where(this.held(userId, key, claimId))
        .catch(() => undefined);
    }, this.staleAfterMs / BEATS_PER_STALE);
    beat.unref();
    return { progressed: () => (progressed = true), stop: () => clearInterval(beat) };
  }

  /**
   * Keeps the result for replay. On `db`, the transaction that stores what the result says was stored:
   * a key taken over meanwhile (see `claim`) is the retry's, which will store its own answer, so this
   * one throws KeyTakenOver (IDEMPOTENCY_CONFLICT) and its transaction stores nothing (two answers to one question).
   */
  async complete(userId: string, key: string, claimId: string, response: T, db: Db = this.db): Promise<void> {
    const kept = await db
      .update(idempotencyKeys)
      .set({ state: 'done', response })
      .where(this.held(userId, key, claimId))
      .returning({ key: idempotencyKeys.key });
    if (!kept.length) throw new KeyTakenOver();
  }

  /**
   * Frees a key whose request failed, so that the client may retry with the same key; a key taken over
   * meanwhile stays with the request running it.
   */
  async release(userId: string, key: string, claimId: string): Promise<void> {
    await this.db.delete(idempotencyKeys).where(this.held(userId, key, claimId));
  }

  /**
   * Deletes the keys past their replay window, oldest first (by the `created_at` index), `batchSize` per
   * statement so that none holds many row locks for long, and skipping rows another statement has locked
   * (a claim taking one over, another instance's sweep). A key still running and not stale stays: its
   * request may yet complete it. Asks `stop` between batches; resolves with how many it deleted.
   */
  async sweep(batchSize = SWEEP_BATCH, stop: () => boolean = () => false): Promise<number> {
    let removed = 0;
    for (;;) {
      const batch = this.db
        .select({ userId: idempotencyKeys.userId, key: idempotencyKeys.key })
        .from(idempotencyKeys)
        .where(and(this.expired, or(eq(idempotencyKeys.state, 'done'), this.stale)))
        .orderBy(idempotencyKeys.createdAt)
        .limit(batchSize)
        .for('update', { skipLocked: true });
      const deleted = await this.db
        .delete(idempotencyKeys)
        .where(sql`(${idempotencyKeys.userId}, ${idempotencyKeys.key}) in ${batch}`)
        .returning({ key: idempotencyKeys.key });
      removed += deleted.length;
      if (deleted.length < batchSize || stop()) return removed;
    }
  }

  /** The key's row while the claim `claimId` still holds it (running, not taken over). */
  private held(userId: string, key: string, claimId: string) {
    return and(
      eq(idempotencyKeys.userId, userId),
      eq(idempotencyKeys.key, key),
      eq(idempotencyKeys.state, 'running'),
      eq(idempotencyKeys.claimId, claimId),
    );
  }
}
