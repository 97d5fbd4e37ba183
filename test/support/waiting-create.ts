import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { expect } from 'vitest';
import { uuidv7 } from '../../src/db/ids.js';

/** Rows created under a parent row that a create locks (a user's projects, a project's prompts and files), as the walk below sees them. */
export interface RowsUnderParent {
  app: FastifyInstance;
  /** The caller's, owning the parent. */
  headers: Record<string, string>;
  /** The list's path, which a POST creates under. */
  list: string;
  /** A throwaway PostgreSQL database the app runs on. */
  url: string;
  table: string;
  /** A text column that the create's request sets to `value`. */
  column: string;
  /** The create's request, `column` set to `value`: a JSON body, or a form with its Content-Type header. */
  create: (value: string) => { payload: object | Buffer; headers?: Record<string, string> };
  /** The parent row: a user's or a project's. */
  parent: { table: 'users' | 'projects'; id: string };
  /** Inserts a row `id` under the parent ($2), as another create holding the parent's lock would (its time the clock's then). */
  insertRow: string;
}

/** Advisory lock that holds a gated create at its insert (any number: the database is the test's own). */
const GATE = 7_007;

/**
 * A create that waits for its parent's lock while other creates under it commit is listed after them,
 * also to a client whose walk of the list passed them before it committed. Another transaction holds the
 * parent's lock and, while the create waits for it, stores two rows with ids and times taken then; once
 * the create has the lock, a trigger holds its insert until the walk has passed the first of them.
 */
export async function expectWaitingCreateListedLast(rows: RowsUnderParent): Promise<void> {
  const page = async (cursor: string | null): Promise<{ data: { id: string }[]; nextCursor: string | null }> =>
    (await rows.app.inject({ method: 'GET', url: `${rows.list}?limit=1${cursor ? `&cursor=${cursor}` : ''}`, headers: rows.headers })).json();
  const gate = new pg.Client({ connectionString: rows.url });
  const other = new pg.Client({ connectionString: rows.url });
  await Promise.all([gate.connect(), other.connect()]);
  /** Until a statement is waiting for what `client` holds. */
  const blocking = async (client: pg.Client) => {
    const { pid } = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0]!;
    while ((await gate.query('select 1 from pg_stat_activity where $1 = any(pg_blocking_pids(pid))', [pid])).rowCount === 0) await sleep(5);
  };
  await gate.query(`create function test_gate() returns trigger language plpgsql as $$ begin perform pg_advisory_xact_lock_shared(${GATE}); return new; end $$`);
  await gate.query(`create trigger test_gate before insert on ${rows.table} for each row when (new.${rows.column} = 'gated') execute function test_gate()`);
  let created: Promise<{ statusCode: number; json(): { id: string } }> | undefined;
  try {
    await gate.query('select pg_advisory_lock($1)', [GATE]);
    await other.query('begin');
    await other.query(`select 1 from ${rows.parent.table} where id = $1 for no key update`, [rows.parent.id]);
    const { payload, headers } = rows.create('gated');
    created = rows.app.inject({ method: 'POST', url: rows.list, headers: { ...rows.headers, ...headers }, payload });
    await blocking(other);
    const others = [uuidv7(), uuidv7()];
    for (const id of others) await other.query(rows.insertRow, [id, rows.parent.id]);
    await other.query('commit');
    await blocking(gate);

    const first = await page(null);
    expect(first.data.map((row) => row.id)).toEqual([others[0]]);
    await gate.query('select pg_advisory_unlock($1)', [GATE]);
    const response = await created;
    expect(response.statusCode).toBe(201);
    const seen: string[] = [];
    for (let cursor = first.nextCursor; cursor; ) {
      const next = await page(cursor);
      seen.push(...next.data.map((row) => row.id));
      cursor = next.nextCursor;
    }
    expect(seen).toEqual([others[1], response.json().id]);
  } finally {
    // Whatever failed, the create is let through before its table's trigger is dropped.
    await other.query('rollback');
    await gate.query('select pg_advisory_unlock_all()');
    await created;
    await gate.query(`drop trigger test_gate on ${rows.table}; drop function test_gate()`);
    await Promise.all([gate.end(), other.end()]);
  }
}
