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
export const param = (name: string, type: 'text' | 'integer' | 'bigint' | 'uuid' | 'timestamptz') => sql`${sql.placeholder(name)}::${sql.raw(type)}`;

/** The FROM of a statement that selects one value computed from its parameters: it needs no table. */
export const oneRow = sql`(select) as one_row`;

/** The parent row of a create: the one of `table` that `where` selects (a prepared statement's parameters). */
export interface Parent {
  table: PgTable & { id: PgColumn };
  where: SQL;
}

type Insert<Table extends PgTable> = Table['$inferInsert'];

export interface LimitedInsertOptions<Table extends PgTable> {
  /** The prepared statement's name. */
  name: string;
  limit: CountLimit;
  parent: Parent;
  table: Table;
  /** The column of `table` that names the parent. */
  parentColumn: keyof Insert<Table>;
  /**
   * What orders the list of the rows under the parent, made once the parent is locked by a function of
   * migration 0007 or 0009: the row's id (`newId`), or else its `createdAt` (`newCreatedAt`) and the id is
   * the parameter `id`, taken before the statement waits for the lock: files, whose bytes are stored
   * under their id before their row is written. `newest` is the parent's column that keeps the newest
   * key made (migration 0011), which the next one comes after even once this row is deleted.
   */
  order: ({ newId: 'new_project_id' | 'new_prompt_id' } | { newCreatedAt: 'new_file_created_at' }) & { newest: PgColumn };
  /** The other columns; not the key's (`id`, `createdAt` and for a row ordered by its id `updatedAt`). */
  values: { [Key in keyof Insert<Table>]?: SQL };
}

/** The time a version 7 UUID was made at (its first 48 bits: milliseconds since the epoch). */
const uuidv7Time = (id: SQL) => sql`timestamptz 'epoch' + ('x' || substr(replace(${id}::text, '-', ''), 1, 12))::bit(48)::bigint * interval '1 millisecond'`;

/**
 * The `updatedAt` of a change to a row that `limitedInsert` made: the database's clock, and always later
 * than the version before (its creation's millisecond included), so that each version of the row has a
 * time of its own. A prompt's time names its token count, kept between turns (ChatService): two edits
 * within one millisecond of an instance's clock had the same time, and turns went on counting the first.
 */
export const changedAt = (updatedAt: PgColumn) => sql<Date>`greatest(clock_timestamp(), ${updatedAt} + interval '1 microsecond')`;

/** A create under a count limit, prepared: see `limitedInsert`. */
export interface LimitedInsert<Row> {
  readonly limit: CountLimit;
  /**
   * The row inserted with `params`. No parent is `missing()` (404 for a project: another user's is
   * answered so too, whatever it holds, so a limit never tells that it exists); a parent and no row
   * inserted is the limit's refusal, CountLimitReached.
   */
  run(params: Record<string, unknown>, missing: () => ApiError): Promise<Row>;
}

/**
 * A create's one statement under a count limit: the parent row selected (owner-checked where the
 * parent is a project) and locked, and the row inserted only while the parent holds fewer than
 * `limit.max` rows; the parent left-joined with what was inserted is the answer.
 *
 * Race-free under READ COMMITTED. Creates under one parent wait for each other's lock, then count with
 * the counter function, which takes a snapshot of its own (it is VOLATILE): it sees every row committed
 * by the creates that held the lock before. A count(*) in the statement itself would not: the
 * statement's snapshot is taken when it starts, before its lock is granted, and N creates at once with
 * one slot left would each count the same and all insert. FOR UPDATE: the statement then writes the
 * parent row too (its newest key, `marked`). Under FOR NO KEY UPDATE the foreign-key checks of other
 * writes under the parent (a chat's messages, a keyed chat's key) share the row meanwhile, so that the
 * write had to wait for the next create queued for the lock, which waited for this one: PostgreSQL
 * failed one of the two (a deadlock), a 500. Those checks now wait for this one statement instead.
 *
 * What the list of the rows under the parent is ordered by (`order`: the id, or the time and then the
 * id) is made after the lock too, later than that of every row under the parent, so that it follows
 * the order the rows are committed in. Made before the wait, it could be older than that of creates
 * that got the lock first and committed; a client whose walk of the list passed them would never be
 * shown this row.
 */
export function limitedInsert<Table extends PgTable>(db: Db, options: LimitedInsertOptions<Table>): LimitedInsert<Table['$inferSelect']> {
  const { name, limit, table } = options;
  const parent = db.$with('parent').as(db.select({ id: options.parent.table.id }).from(options.parent.table).where(options.parent.where).for('update'));
  const columns = getTableColumns(table) as Record<string, PgColumn>;
  const { order } = options;
  // The list key, made once the parent is locked, in a lateral subquery: a row ordered by its id takes
  // that id's millisecond as its times, so that no list is in an order its own createdAt contradicts
  // (taken from the clock of the instance that served the create, it was behind its predecessors' on an
  // instance whose clock is behind, or after a clock was set back).
  const made = sql`${sql.identifier('made')}.${sql.identifier('key')}`;
  const keyOrder: [string, SQL][] =
    'newId' in order
      ? [
          ['id', made],
          ['createdAt', uuidv7Time(made)],
          ['updatedAt', uuidv7Time(made)],
        ]
      : [['id', sql`${sql.placeholder('id')}::uuid`], ['createdAt', made]];
  const given: [string, SQL | PgColumn][] = [...keyOrder, [options.parentColumn as string, parent.id], ...(Object.entries(options.values) as [string, SQL][])];
  const makeKey = sql.raw('newId' in order ? order.newId : order.newCreatedAt);
  const inserted = db.$with('inserted', columns).as(
    sql`insert into ${table} (${sql.join(
      given.map(([key]) => sql.identifier(columns[key]!.name)),
      sql`, `,
    )}) select ${sql.join(
      given.map(([, value]) => value),
      sql`, `,
    )} from ${parent} cross join lateral (select ${makeKey}(${parent.id}) as key) as made where ${sql.raw(limit.counter)}(${parent.id}) < ${limit.max}::integer returning *`,
  );
  // Under the lock the parent CTE holds; a statement's data-modifying CTEs all run, used or not.
  const key = columns['newId' in order ? 'id' : 'createdAt']!;
  const marked = db.$with('marked', {}).as(
    sql`update ${options.parent.table} set ${sql.identifier(order.newest.name)} = ${sql.identifier('inserted')}.${sql.identifier(key.name)} from ${inserted} where ${options.parent.table.id} = ${sql.identifier('inserted')}.${sql.identifier(columns[options.parentColumn as string]!.name)} returning 1 as marked`,
  );
  const statement = db.with(parent, inserted, marked).select().from(parent).leftJoin(inserted, sql`true`).prepare(name);
  return {
    limit,
    async run(params, missing) {
      const [found] = (await statement.execute(params)) as { inserted: Table['$inferSelect'] | null }[];
      if (!found) throw missing();
      if (!found.inserted) throw new CountLimitReached(limit);
      return found.inserted;
    },
  };
}
