import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { type Database, type HeldConnection, openPostgres } from '../../src/db/database.js';
import { hasCode } from '../../src/db/error-code.js';
import { NamedStatement, type TypeParsers } from '../../src/db/named-statement.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

/** pg's connection under a client, the part whose messages these tests count. */
interface Connection {
  parse(...args: unknown[]): void;
  describe(...args: unknown[]): void;
}

// A statement of the driver `pg`, which only PostgreSQL uses: on PGlite, `direct` runs drizzle's query config.
describe.runIf(process.env.TEST_DATABASE_URL)('a named statement on pg', () => {
  let testDb: TestDatabase;
  let database: Database;
  const held: HeldConnection[] = [];

  beforeAll(async () => {
    testDb = await createTestDatabase();
    database = testDb.database;
  });
  afterAll(async () => {
    for (const connection of held) connection.release();
    await testDb.drop();
  });

  /** A connection of the pool, held for the test, with pg's own client and connection under it. */
  async function hold() {
    const connection = await database.hold();
    held.push(connection);
    const client = (connection.db as unknown as { $client: pg.PoolClient }).$client;
    return { client, connection: (client as unknown as { connection: Connection }).connection };
  }

  const run = (client: pg.ClientBase | pg.Pool, statement: NamedStatement, values: unknown[]) => statement.run(client as never, values);

  const text = 'select $1::integer + 1 as n, $2::timestamptz as at, null::text as nothing from generate_series(1, 2)';

  it("answers each execution's rows as arrays, parsed as pg parses them, describing the result once per connection", async () => {
    const statement = new NamedStatement('named_test_rows', text, pg.types);
    const at = new Date('2026-12-06T10:11:12.345Z');
    const first = await hold();
    const described = vi.spyOn(first.connection, 'describe');
    const parsed = vi.spyOn(first.connection, 'parse');
    for (let i = 0; i < 3; i++) {
      expect(await run(first.client, statement, [i, at])).toStrictEqual([
        [i + 1, at, null],
        [i + 1, at, null],
      ]);
    }
    // And the same rows as pg's own query of the same statement.
    expect((await first.client.query({ text, values: [1, at], rowMode: 'array' })).rows).toStrictEqual(await run(first.client, statement, [1, at]));
    expect(parsed).toHaveBeenCalledTimes(2); // the statement once, pg's unnamed one once
    expect(described).toHaveBeenCalledTimes(2); // the statement at its first execution, pg's at its only one
    // Another connection parses the statement, and describes it, for itself.
    const second = await hold();
    const describedThere = vi.spyOn(second.connection, 'describe');
    expect(await run(second.client, statement, [5, at])).toStrictEqual([
      [6, at, null],
      [6, at, null],
    ]);
    expect(await run(second.client, statement, [6, at])).toHaveLength(2);
    expect(describedThere).toHaveBeenCalledTimes(1);
    // Through the pool, as drizzle sends it.
    expect(await run((database.db as unknown as { $client: pg.Pool }).$client, statement, [7, at])).toStrictEqual([
      [8, at, null],
      [8, at, null],
    ]);
  });

  it("answers on pg's own client too, which returns a query object itself rather than a promise", async () => {
    const client = new pg.Client({ connectionString: testDb.url });
    await client.connect();
    try {
      expect(await run(client, new NamedStatement('named_test_plain', 'select $1::integer * 2 as n', pg.types), [21])).toStrictEqual([[42]]);
      const error = await run(client, new NamedStatement('named_test_plain_error', 'select 1 / $1::integer as n', pg.types), [0]).catch((caught: unknown) => caught);
      expect(hasCode(error, '22012')).toBe(true); // division_by_zero
    } finally {
      await client.end();
    }
  });

  it("fails an execution with the database's error, and the next on its connection is answered", async () => {
    const statement = new NamedStatement('named_test_error', 'select 10 / $1::integer as n', pg.types);
    const { client, connection } = await hold();
    const described = vi.spyOn(connection, 'describe');
    expect(await run(client, statement, [2])).toStrictEqual([[5]]);
    const error = await run(client, statement, [0]).catch((caught: unknown) => caught);
    expect(hasCode(error, '22012')).toBe(true); // division_by_zero
    expect(await run(client, statement, [5])).toStrictEqual([[2]]);
    expect(described).toHaveBeenCalledTimes(1);
    // Its first execution failing before its result was described (10 / 0 fails at Bind, folded as a
    // constant): described at the next.
    const fresh = new NamedStatement('named_test_error_first', 'select 10 / $1::integer as n', pg.types);
    expect(hasCode(await run(client, fresh, [0]).catch((caught: unknown) => caught), '22012')).toBe(true);
    expect(await run(client, fresh, [1])).toStrictEqual([[10]]);
    expect(described).toHaveBeenCalledTimes(3);
    // Its first execution failing after its result was described (at a row): not described again.
    const rows = new NamedStatement('named_test_error_rows', 'select 10 / g as n from generate_series($1::integer, 2) as g', pg.types);
    expect(hasCode(await run(client, rows, [0]).catch((caught: unknown) => caught), '22012')).toBe(true);
    expect(await run(client, rows, [1])).toStrictEqual([[10], [5]]);
    expect(described).toHaveBeenCalledTimes(4);
  });

  it('fails an execution whose value pg cannot send, or whose row a parser refuses, and keeps its connection working', async () => {
    const statement = new NamedStatement('named_test_refused', 'select $1::text as t', pg.types);
    const { client, connection } = await hold();
    const parsed = vi.spyOn(connection, 'parse');
    const unsendable = {
      toPostgres() {
        throw new Error('cannot be sent');
      },
    };
    await expect(run(client, statement, [unsendable])).rejects.toThrow('cannot be sent');
    // The statement was parsed before its value failed, and stays prepared: not parsed again.
    expect(await run(client, statement, ['a'])).toStrictEqual([['a']]);
    expect(parsed).toHaveBeenCalledTimes(1);

    const refusing: TypeParsers = {
      getTypeParser: (typeId, format) => {
        const parser = pg.types.getTypeParser(typeId, format as 'text');
        return (value: string) => {
          if (value === 'refused') throw new Error('a parser refused the row');
          return parser(value);
        };
      },
    };
    const parsing = new NamedStatement('named_test_parser', "select unnest(array['a', $1::text]) as t", refusing);
    await expect(run(client, parsing, ['refused'])).rejects.toThrow('a parser refused the row');
    expect(await run(client, parsing, ['b'])).toStrictEqual([['a'], ['b']]);
  });

  it("refuses, in pg's words, a name its connection has prepared for another statement", async () => {
    const { client } = await hold();
    expect(await run(client, new NamedStatement('named_test_twice', 'select 1 as one', pg.types), [])).toStrictEqual([[1]]);
    await expect(run(client, new NamedStatement('named_test_twice', 'select 2 as two', pg.types), [])).rejects.toThrow(
      "Prepared statements must be unique - 'named_test_twice' was used for a different statement",
    );
    expect((await client.query('select 3 as three')).rows).toEqual([{ three: 3 }]);
  });

  it('is bound as every statement of a connection is: unanswered past the bound, it fails and its connection is closed', async () => {
    // Bound at 100 ms + 1 s unanswered.
    const bounded = openPostgres(testDb.url!, { max: 1, queryTimeoutMs: 100 });
    try {
      const connection = await bounded.hold();
      const client = (connection.db as unknown as { $client: pg.PoolClient }).$client;
      // The database's own bound lifted on this connection: only the driver's is left.
      await client.query('set statement_timeout = 0');
      const started = Date.now();
      const error = await run(client, new NamedStatement('named_test_sleep', 'select pg_sleep($1)', pg.types), [30]).catch((caught: Error) => caught);
      expect(error).toMatchObject({ message: 'Query read timeout' });
      expect(Date.now() - started).toBeLessThan(10_000);
      await expect(client.query('select 1')).rejects.toThrow(/not queryable|closed/);
      connection.release(error as Error);
    } finally {
      await bounded.close();
    }
  });
});
