import { and, eq, inArray, sql } from 'drizzle-orm';
import type { FastifyBaseLogger } from 'fastify';
import { uuidv7 } from '../../db/ids.js';
import type { Database, Db } from '../../db/database.js';
import { files, projects, users } from '../../db/schema.js';
import { assertTokenCurrent, type AuthUser, type Tokens } from '../../http/auth.js';
import { hasCode } from '../../db/error-code.js';
import { Conflict, Forbidden, NotFound, Unauthorized } from '../../http/errors.js';
import { waitForFileWrites } from '../files/deleting.js';
import type { StoredFileDiscarder } from '../files/service.js';
import type { ForgetsHistory } from '../chat/history-cache.js';
import type { PasswordHasher } from './password-hasher.js';
import type { UserDto } from './schemas.js';
import { isoString } from '../../iso-string.js';

type UserRow = typeof users.$inferSelect;

const UNIQUE_VIOLATION = '23505';

function toDto(row: UserRow): UserDto {
  return { id: row.id, email: row.email, name: row.name, createdAt: isoString(row.createdAt) };
}

export class AuthService {
  /** A hash of a random password at the configured cost, compared against when the email is unknown,
   *  so that an unknown email takes as long to refuse as a wrong password. */
  private dummyHash: Promise<string> | undefined;

  private readonly db: Db;

  constructor(
    private readonly database: Pick<Database, 'db' | 'transaction'>,
    private readonly tokens: Tokens,
    private readonly passwords: PasswordHasher,
    private readonly storedFiles: StoredFileDiscarder,
    private readonly history: ForgetsHistory,
  ) {
    this.db = database.db;
  }

  /** `clientGone` (the request's, see `clientGoneSignal`) here and below: a hash still waiting for a thread then is given up. */
  async register(input: { email: string; password: string; name: string }, clientGone?: AbortSignal) {
    const passwordHash = await this.passwords.hash(input.password, clientGone);
    const now = new Date();
    try {
      const [row] = await this.db
        .insert(users)
        .values({ id: uuidv7(), email: input.email, passwordHash, name: input.name, createdAt: now, updatedAt: now })
        .returning();
      return this.session(row!);
    } catch (error) {
      if (hasCode(error, UNIQUE_VIOLATION)) throw new Conflict('An account with this email already exists');
      throw error;
    }
  }

  async login(input: { email: string; password: string }, log: FastifyBaseLogger, clientGone?: AbortSignal) {
    const [row] = await this.db.select().from(users).where(sql`lower(${users.email}) = ${input.email}`);
    const hash = row?.passwordHash ?? (await this.unknownUserHash());
    const matches = await this.passwords.compare(input.password, hash, clientGone);
    // A hash made at a lower cost (BCRYPT_ROUNDS raised since) is compared in less time than an unknown
    // email's, until its owner logs in and it is hashed again: a wrong password for it is compared against
    // that one too, so that it takes at least as long, and tells nothing of which emails exist. (A hash of
    // a higher cost takes longer, which no comparison more can hide.)
    if (row && !matches && this.passwords.cheaperThanConfigured(row.passwordHash)) {
      await this.passwords.compare(input.password, await this.unknownUserHash(), clientGone);
    }
    if (!row || !matches) throw new Unauthorized('Invalid email or password');
    const rehashed = this.passwords.needsRehash(row.passwordHash) ? await this.rehash(row, input.password, log) : undefined;
    // Read again once the password matched: a password change or the account's deletion may have committed
    // while it was compared (behind other hashes on the threads), and a session of the password as it was
    // would be refused at its first use, or a deleted account's.
    const [current] = await this.db.select({ tokenVersion: users.tokenVersion, passwordHash: users.passwordHash }).from(users).where(eq(users.id, row.id));
    if (!current || (current.passwordHash !== row.passwordHash && current.passwordHash !== rehashed)) {
      throw new Unauthorized('Invalid email or password');
    }
    return this.session({ ...row, tokenVersion: current.tokenVersion });
  }

  /**
   * Hashes a password just verified again at the configured cost (`BCRYPT_ROUNDS` changed since it was
   * hashed), so that its logins take as long as an unknown email's. Tokens stay valid: the password is
   * the same. Only while the hash is still the one verified: a password changed meanwhile is kept. A
   * failure (a full queue) costs the login nothing; the next one tries again. Resolves with the new hash
   * when it was stored.
   */
  private async rehash(row: UserRow, password: string, log: FastifyBaseLogger): Promise<string | undefined> {
    try {
      const passwordHash = await this.passwords.hash(password);
      const stored = await this.db
        .update(users)
        .set({ passwordHash })
        .where(and(eq(users.id, row.id), eq(users.passwordHash, row.passwordHash)))
        .returning({ id: users.id });
      return stored.length ? passwordHash : undefined;
    } catch (error) {
      log.warn({ err: error }, 'password not hashed again at the configured cost');
      return undefined;
    }
  }

  async me(userId: string): Promise<UserDto> {
    const [row] = await this.db.select().from(users).where(eq(users.id, userId));
    if (!row) throw new NotFound('User');
    return toDto(row);
  }

  async updateMe(userId: string, input: { name: string }): Promise<UserDto> {
    const [row] = await this.db
      .update(users)
      .set({ name: input.name, updatedAt: new Date() })
      .where(eq(users.id, userId))
      .returning();
    if (!row) throw new NotFound('User');
    return toDto(row);
  }

  /**
   * Only while the caller's token is still current: a change that another one revoked it for while its
   * password was checked (two changes sent at once) is 401, as the token now is, and changes nothing.
   */
  async changePassword(user: AuthUser, input: { currentPassword: string; newPassword: string }, clientGone?: AbortSignal): Promise<void> {
    await this.checkPassword(user, input.currentPassword, clientGone);
    const passwordHash = await this.passwords.hash(input.newPassword, clientGone);
    const changed = await this.db
      .update(users)
      .set({ passwordHash, tokenVersion: sql`${users.tokenVersion} + 1`, updatedAt: new Date() })
      .where(and(eq(users.id, user.id), eq(users.tokenVersion, user.tokenVersion)))
      .returning({ id: users.id });
    if (changed.length === 0) throw new Unauthorized('Invalid or expired token');
  }

  /**
   * Deletes the account; foreign keys cascade to its projects and everything under them. Only while the
   * caller's token is still current (a password change may have revoked it while its password was checked).
   */
  async deleteMe(user: AuthUser, input: { password: string }, log: FastifyBaseLogger, clientGone?: AbortSignal): Promise<void> {
    const userId = user.id;
    await this.checkPassword(user, input.password, clientGone);
    // File rows first, in the same transaction: the cascade would forget which bytes and provider copies to
    // remove. The account and its projects are locked before, so that no upload (nor a project to upload
    // into) adds a row between the two deletes for the cascade to take.
    const { fileRows: removedFiles, projectRows } = await this.database.transaction(async (tx) => {
      await waitForFileWrites(tx);
      const [row] = await tx.select({ tokenVersion: users.tokenVersion }).from(users).where(eq(users.id, userId)).for('update');
      assertTokenCurrent(user, row);
      const projectRows = await tx.select({ id: projects.id }).from(projects).where(eq(projects.userId, userId)).for('update');
      const fileRows = await tx
        .delete(files)
        .where(inArray(files.projectId, tx.select({ id: projects.id }).from(projects).where(eq(projects.userId, userId))))
        .returning({ id: files.id, projectId: files.projectId, providerFileId: files.providerFileId });
      await tx.delete(users).where(eq(users.id, userId));
      return { fileRows, projectRows };
    });
    // Nothing of its conversations is kept in this process either.
    for (const { id } of projectRows) this.history.forget(id);
    await this.storedFiles.discard(removedFiles, log);
  }

  /**
   * The caller's password, compared only while the caller's token is current: a password change that
   * committed first (another request with the same token) revoked it, and the password it compared
   * against was the new one, so the loser was told its right password was wrong (403), not its token gone (401).
   */
  private async checkPassword(user: AuthUser, password: string, clientGone?: AbortSignal): Promise<void> {
    const [row] = await this.db.select({ passwordHash: users.passwordHash, tokenVersion: users.tokenVersion }).from(users).where(eq(users.id, user.id));
    assertTokenCurrent(user, row);
    if (!(await this.passwords.compare(password, row!.passwordHash, clientGone))) throw new Forbidden('The password is wrong');
  }

  private session(row: UserRow) {
    return { token: this.tokens.issue(row), user: toDto(row) };
  }

  /** Ends the password hashing threads. */
  close(): Promise<void> {
    return this.passwords.close();
  }

  private unknownUserHash(): Promise<string> {
    if (!this.dummyHash) {
      const dummyHash = this.passwords.hash(`unknown-user-${uuidv7()}`);
      // A hash refused while the queue was full is tried again by the next unknown email, not kept.
      dummyHash.catch(() => {
        if (this.dummyHash === dummyHash) this.dummyHash = undefined;
      });
      this.dummyHash = dummyHash;
    }
    return this.dummyHash;
  }
}
