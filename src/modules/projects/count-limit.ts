import { getTableColumns, type SQL, sql } from 'drizzle-orm';
import type { PgColumn, PgTable } from 'drizzle-orm/pg-core';
import type { Db } from '../../db/database.js';
import { type ApiError, Conflict } from '../../http/errors.js';

/**
 * A limit on how many rows of a kind one parent (a user, a project) may hold, as configured.
 * `counter` is the function of migration 0005 that counts them.
 */
export interface CountLimit {
  counter: 'projects_of_user' | 'prompts_of_project' | 'files_of_project';
  max: number;
  /** The configuration variable that sets `max`, named to the client it refuses. */
  variable: string;
  /** For the refusal's detail: what holds the rows, and what they are. */
  holder: string;
  rows: string;
}

export const projectsPerUser = (max: number): CountLimit => ({
  counter: 'projects_of_user',
  max,
  variable: 'MAX_PROJECTS_PER_USER',
  holder: 'This account',
  rows: 'projects',
});

export const promptsPerProject = (max: number): CountLimit => ({
  counter: 'prompts_of_project',
  max,
  variable: 'MAX_PROMPTS_PER_PROJECT',
  holder: 'This project',
  rows: 'prompts',
});

export const filesPerProject = (max: number): CountLimit => ({
  counter: 'files_of_project',
  max,
  variable: 'MAX_FILES_PER_PROJECT',
  holder: 'This project',
  rows: 'files',
});

/**
 * One create over its limit: 409, nothing stored. Not "has N": a limit lowered since leaves more rows
 * than it allows, and they stay.
 */
export class CountLimitReached extends Conflict {
  constructor({ max, variable, holder, rows }: CountLimit) {
    super(`${holder} already has the most ${rows} it may hold: ${max} (${variable})`);
  }
}

/** A statement parameter named `name`, cast to `type`: an insert's source select infers no types of its own. */
export const param = (name: string, type: 'uuid' | 'text' | 'bigint' | 'timestamptz') => sql`${sql.placeholder(name)}::${sql.raw(type)}`;

type Values<Table extends PgTable> = { [Key in keyof Table['$inferInsert']]?: SQL | PgColumn };

/**
 * The two parts of a create's one statement under a count limit: `parent`, the parent row selected by
 * `parentWhere` (owner-checked where the parent is a project) and locked; `inserted`, the row of `table`
 * with `values`, inserted only while the parent holds fewer than `limit.max` rows. Select the parent
 * left-joined with what was inserted (see `insertedUnder`).
 *
 * Race-free under READ COMMITTED. Creates under one parent wait for each other's lock, then count with
 * the counter function, which takes a snapshot of its own (it is VOLATILE): it sees every row committed
 * by the creates that held the lock before. A count(*) in the statement itself would not: the
 * statement's snapshot is taken when it starts, before its lock is granted, and N creates at once with
 * one slot left would each count the same and all insert. FOR NO KEY UPDATE, not FOR UPDATE: it neither
 * waits for nor holds up the foreign-key checks of other writes under the parent (a chat's messages).
 */
export function insertUnderLimit<Table extends PgTable>(
  db: Db,
  limit: CountLimit,
  parentTable: PgTable & { id: PgColumn },
  parentWhere: SQL,
  table: Table,
  values: (parentId: PgColumn) => Values<Table>,
) {
  const parent = db.$with('parent').as(db.select({ id: parentTable.id }).from(parentTable).where(parentWhere).for('no key update'));
  const columns = getTableColumns(table);
  const given = Object.entries(values(parent.id)) as [keyof typeof columns, SQL | PgColumn][];
  const inserted = db.$with('inserted', columns).as(
    sql`insert into ${table} (${sql.join(
      given.map(([key]) => sql.identifier(columns[key]!.name)),
      sql`, `,
    )}) select ${sql.join(
      given.map(([, value]) => value),
      sql`, `,
    )} from ${parent} where ${sql.raw(limit.counter)}(${parent.id}) < ${limit.max}::integer returning *`,
  );
  return { parent, inserted };
}

/**
 * The row the statement of `insertUnderLimit` inserted. No parent is `missing()` (404 for a project:
 * another user's is answered so too, whatever it holds, so a limit never tells that it exists); a
 * parent and nothing inserted is the limit's refusal.
 */
export function insertedUnder<Row>(result: { inserted: Row | null }[], limit: CountLimit, missing: () => ApiError): Row {
  const [found] = result;
  if (!found) throw missing();
  if (!found.inserted) throw new CountLimitReached(limit);
  return found.inserted;
}
