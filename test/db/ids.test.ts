import { sql } from 'drizzle-orm';
import { validate, version } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { uuidv7 } from '../../src/db/ids.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

describe('row ids', () => {
  it('are UUIDs of version 7 whose first 48 bits are the time they were made, in milliseconds', () => {
    const before = Date.now();
    const id = uuidv7();
    const after = Date.now();
    expect(validate(id) && version(id)).toBe(7);
    expect(id[19]).toMatch(/[89ab]/); // the RFC 9562 variant
    const ms = Number.parseInt(id.replace(/-/g, '').slice(0, 12), 16);
    expect(ms).toBeGreaterThanOrEqual(before);
    expect(ms).toBeLessThanOrEqual(after);
  });

  it('sort in the order they were made and never repeat, many to a millisecond and across draws of randomness', () => {
    const ids = Array.from({ length: 20_000 }, () => uuidv7());
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.every((id, i) => i === 0 || ids[i - 1]! < id)).toBe(true);
    // Many share a millisecond: their order is the counter's, not the time's.
    expect(new Set(ids.map((id) => id.slice(0, 13))).size).toBeLessThan(ids.length / 10);
    expect(ids.every((id) => validate(id) && version(id) === 7)).toBe(true);
  });

  it('end in 40 random bits drawn for each id', () => {
    const tails = Array.from({ length: 2_000 }, () => uuidv7().slice(-10));
    // 2,000 draws of 40 bits all differ unless the bits are not drawn afresh (a repeat has odds of about 2e-6).
    expect(new Set(tails).size).toBe(tails.length);
  });
});

describe('ids made by the database after a row under the same parent (uuidv7_after, migration 0007)', () => {
  let testDb: TestDatabase;
  beforeAll(async () => {
    testDb = await createTestDatabase();
  });
  afterAll(() => testDb.drop());

  /** `count` ids, each made after the one before, starting after `first`. */
  async function chain(first: string | null, count: number): Promise<string[]> {
    const result = (await testDb.database.db.execute(
      sql`with recursive ids(n, id) as (select 1, uuidv7_after(${first}::uuid) union all select n + 1, uuidv7_after(id) from ids where n < ${count}) select id::text from ids order by n`,
    )) as unknown as { rows: { id: string }[] };
    return result.rows.map((row) => row.id);
  }

  it('are UUIDs of version 7 stamped with the database clock, each greater than the one before, many to a millisecond', async () => {
    const before = Date.now();
    const ids = await chain(null, 2_000);
    const after = Date.now();
    expect(ids.every((id) => validate(id) && version(id) === 7 && /[89ab]/.test(id[19]!))).toBe(true);
    expect(ids.every((id, i) => i === 0 || ids[i - 1]! < id)).toBe(true);
    expect(new Set(ids.map((id) => id.slice(0, 13))).size).toBeLessThan(ids.length);
    const ms = Number.parseInt(ids[0]!.replace(/-/g, '').slice(0, 12), 16);
    expect(ms).toBeGreaterThanOrEqual(before - 1_000); // the database's clock, on this machine
    expect(ms).toBeLessThanOrEqual(after + 1_000);
  });

  it('stay greater than the newest when the clock is behind it (set back), carrying the counter into the millisecond', async () => {
    const ahead = 'ffff0000-0000-7ffe-8000-000000000000';
    const ids = await chain(ahead, 3);
    expect(ids.map((id) => id.slice(0, 18))).toEqual(['ffff0000-0000-7fff', 'ffff0000-0001-7000', 'ffff0000-0001-7001']);
    expect(ids.every((id, i) => (i === 0 ? ahead : ids[i - 1]!) < id && id[19]! >= '8' && id[19]! <= 'b')).toBe(true);
  });
});
