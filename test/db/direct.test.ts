import { DefaultLogger, DrizzleQueryError, and, eq, getTableColumns, sql } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { direct } from '../../src/db/direct.js';
import { uuidv7 } from '../../src/db/ids.js';
import { messages, projects, users } from '../../src/db/schema.js';
import { hasCode } from '../../src/db/error-code.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

// Statements run by `direct` and by drizzle side by side, on the test's database (PostgreSQL with
// TEST_DATABASE_URL, embedded PGlite without it): the same rows, of the same types, the same errors.
describe('a prepared statement executed directly', () => {
  let testDb: TestDatabase;
  const userId = uuidv7();
  const projectId = uuidv7();
  const createdAt = new Date('2026-12-06T10:11:12.345Z');

  beforeAll(async () => {
    testDb = await createTestDatabase();
    const { db } = testDb.database;
    await db.insert(users).values({ id: userId, email: 'direct@example.com', passwordHash: 'x', name: 'D', tokenVersion: 3 });
    await db.insert(projects).values({ id: projectId, userId, name: 'P', description: null, createdAt, updatedAt: createdAt });
    await db.insert(messages).values([
      { id: uuidv7(), projectId, role: 'user', content: 'a', status: 'complete', createdAt },
      { id: uuidv7(), projectId, role: 'assistant', content: 'b', status: 'complete', promptTokens: 7, createdAt },
    ]);
  });
  afterAll(() => testDb.drop());

  /** Columns of each kind, counts mapped with `Number`, JSON, and a left join that may find nothing. */
  const statement = (name: string) =>
    testDb.database.db
      .select({
        tokenVersion: users.tokenVersion,
        id: projects.id,
        description: projects.description,
        createdAt: projects.createdAt,
        messageCount: testDb.database.db.$count(messages, eq(messages.projectId, projects.id)),
        roles: sql<string[]>`(select coalesce(json_agg(${messages.role} order by ${messages.role}), '[]') from ${messages} where ${messages.projectId} = ${projects.id})`,
        newest: sql<Date | null>`(select max(${messages.createdAt}) from ${messages} where ${messages.projectId} = ${projects.id})`.mapWith(messages.createdAt),
      })
      .from(users)
      .leftJoin(projects, and(eq(projects.id, sql.placeholder('projectId')), eq(projects.userId, users.id)))
      .where(eq(users.id, sql.placeholder('userId')))
      .prepare(name);

  it('returns the rows drizzle returns, each field decoded as drizzle decodes it', async () => {
    const fast = direct(statement('direct_test_fast'));
    const drizzle = statement('direct_test_drizzle');
    expect(Object.hasOwn(fast, 'execute')).toBe(true); // drizzle's own is its prototype's
    for (const params of [{ userId, projectId }, { userId, projectId: uuidv7() }, { userId: uuidv7(), projectId }]) {
      const [got, expected] = await Promise.all([fast.execute(params), drizzle.execute(params)]);
      expect(got).toStrictEqual(expected);
    }
    const [row] = await fast.execute({ userId, projectId });
    expect(row).toStrictEqual({ tokenVersion: 3, id: projectId, description: null, createdAt, messageCount: 2, roles: ['assistant', 'user'], newest: createdAt });
    expect(row!.createdAt).toBeInstanceOf(Date);
    // The key order of drizzle's rows: what JSON and the logs show of them.
    expect(Object.keys(row!)).toEqual(Object.keys((await drizzle.execute({ userId, projectId }))[0]!));
    const [outside] = await fast.execute({ userId, projectId: uuidv7() });
    expect(outside).toStrictEqual({ tokenVersion: 3, id: null, description: null, createdAt: null, messageCount: 0, roles: [], newest: null });
  });

  it('returns every column of a common table expression as drizzle does, and a field named with `as`', async () => {
    const { db } = testDb.database;
    const statements = (name: string) => {
      const found = db.$with('found', getTableColumns(messages)).as(sql`select * from ${messages} where ${messages.projectId} = ${sql.placeholder('projectId')} order by role`);
      const stamped = db.$with('stamped', { at: sql<Date>`at`.mapWith(messages.createdAt).as('at') }).as(sql`select max(created_at) as at from ${found}`);
      return {
        rows: db.with(found).select().from(found).prepare(`${name}_rows`),
        named: db.with(found, stamped).select({ at: stamped.at }).from(stamped).prepare(`${name}_named`),
      };
    };
    const fast = statements('direct_test_cte_fast');
    const drizzle = statements('direct_test_cte_drizzle');
    direct(fast.rows);
    direct(fast.named);
    const rows = await fast.rows.execute({ projectId });
    expect(rows).toStrictEqual(await drizzle.rows.execute({ projectId }));
    expect(rows.map((message) => [message.role, message.promptTokens, message.createdAt])).toStrictEqual([
      ['assistant', 7, createdAt],
      ['user', null, createdAt],
    ]);
    expect(await fast.named.execute({ projectId })).toStrictEqual([{ at: createdAt }]);
    expect(await drizzle.named.execute({ projectId })).toStrictEqual([{ at: createdAt }]);
  });

  it('calls the driver before `execute` returns, as drizzle does (what a held connection queues on)', async () => {
    const fast = direct(statement('direct_test_sync'));
    const { client } = fast as unknown as { client: { query: (...args: unknown[]) => unknown } };
    const sent = vi.spyOn(client, 'query');
    try {
      const pending = fast.execute({ userId, projectId });
      expect(sent).toHaveBeenCalledTimes(1);
      expect(await pending).toHaveLength(1);
    } finally {
      sent.mockRestore();
    }
  });

  it('fails as drizzle does: the same DrizzleQueryError around the database error, its code reachable', async () => {
    const failing = (name: string) =>
      testDb.database.db
        .select({ n: sql<number>`(${sql.placeholder('n')}::integer / 0)` })
        .from(users)
        .prepare(name);
    const error = await direct(failing('direct_test_failing')).execute({ n: 1 }).catch((caught: unknown) => caught);
    const drizzles = await failing('direct_test_failing_drizzle').execute({ n: 1 }).catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(DrizzleQueryError);
    expect(drizzles).toBeInstanceOf(DrizzleQueryError);
    const { message, query, params } = drizzles as DrizzleQueryError;
    expect(error).toMatchObject({ message, query, params });
    expect(hasCode(error, '22012')).toBe(true); // division_by_zero
    // A statement run right after on the same database is answered.
    const working = direct(testDb.database.db.select({ tokenVersion: users.tokenVersion }).from(users).where(eq(users.id, sql.placeholder('id'))).prepare('direct_test_after'));
    expect(await working.execute({ id: userId })).toStrictEqual([{ tokenVersion: 3 }]);
  });

  it('leaves a statement to drizzle while drizzle has a logger to call', () => {
    const logged = statement('direct_test_logged');
    (logged as unknown as { logger: unknown }).logger = new DefaultLogger();
    const original = logged.execute;
    expect(direct(logged).execute).toBe(original);
  });

  it('leaves a selection of nested tables to drizzle, which nests them', async () => {
    const nested = testDb.database.db.select().from(users).leftJoin(projects, eq(projects.userId, users.id)).where(eq(users.id, sql.placeholder('id'))).prepare('direct_test_nested');
    const original = nested.execute;
    expect(direct(nested).execute).toBe(original);
    const [row] = await nested.execute({ id: userId });
    expect(row!.projects?.id).toBe(projectId);
    expect(row!.users.id).toBe(userId);
  });

  it('runs on a held connection, in the order sent', async () => {
    const held = await testDb.database.hold();
    try {
      const read = direct(held.db.select({ tokenVersion: users.tokenVersion }).from(users).where(eq(users.id, sql.placeholder('id'))).prepare('direct_test_held'));
      const bump = direct(held.db.update(users).set({ tokenVersion: sql`${users.tokenVersion} + 1` }).where(eq(users.id, sql.placeholder('id'))).returning({ tokenVersion: users.tokenVersion }).prepare('direct_test_bump'));
      // Both sent at once, on one connection: the read answers with the row before the update.
      const [before, after] = await Promise.all([read.execute({ id: userId }), bump.execute({ id: userId })]);
      expect(before).toEqual([{ tokenVersion: 3 }]);
      expect(after).toEqual([{ tokenVersion: 4 }]);
      await held.db.update(users).set({ tokenVersion: 3 }).where(eq(users.id, userId));
    } finally {
      held.release();
    }
  });
});
