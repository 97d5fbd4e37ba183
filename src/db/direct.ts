import { Column, DrizzleQueryError, fillPlaceholders, is, NoopLogger, SQL, Subquery } from 'drizzle-orm';
import { NoopCache } from 'drizzle-orm/cache/core/cache';
import type { PgPreparedQuery, PreparedQueryConfig } from 'drizzle-orm/pg-core';
import { PglitePreparedQuery } from 'drizzle-orm/pglite';
import { NamedStatement, type TypeParsers } from './named-statement.js';

/** What the statement reads of drizzle's prepared query: its own fields, internal to drizzle's types. */
interface PreparedInternals {
  /** A pg client or pool, or PGlite. */
  client: { query(...args: unknown[]): Promise<{ rows: unknown[][] }> };
  queryString: string;
  params: unknown[];
  fields?: { path: string[]; field: unknown }[];
  customResultMapper?: unknown;
  logger: unknown;
  cache?: unknown;
  /** Its name, and the driver told to leave dates and times as text (drizzle's columns map them). */
  queryConfig: Record<string, unknown> & { name?: string; types?: TypeParsers };
}

interface Decoder {
  mapFromDriverValue(value: unknown): unknown;
}

/** What drizzle keeps as an SQL expression's decoder (internal to its types). */
interface Decoded {
  decoder: Decoder;
}

/** How drizzle's `mapResultRow` decodes a selected field: a column, or the SQL it was selected as. */
function decoderOf(field: unknown): Decoder {
  if (is(field, Column)) return field;
  if (is(field, SQL)) return (field as unknown as Decoded).decoder;
  if (is(field, Subquery)) return (field as unknown as { _: { sql: Decoded } })._.sql.decoder;
  return (field as { sql: Decoded }).sql.decoder;
}

/**
 * `statement` (drizzle's prepared query) executed straight through the driver, with its rows mapped as
 * drizzle maps them: the same rows, the same DrizzleQueryError around a failure, the driver called before
 * `execute` returns (what `Database.hold` counts on to queue statements one behind another). What it
 * leaves out of drizzle's `execute`: three tracing spans and their async functions, the logger and
 * cache hooks, a row mapper that tells each field's kind again for every row, and (on `pg`) a type
 * parser made anew for each date or time column of every result. About 5% of the instructions of a
 * request to `GET /api/v1/projects/:id` (counted under callgrind, docs/benchmarks.md). On `pg`, it runs
 * as a NamedStatement, whose result is described once per connection.
 *
 * Only for a selection whose fields are all at the top of the row (no table nested under its name), and
 * while drizzle has no logger or cache to call: any other statement is returned as it is, for drizzle to
 * run, as is one whose internals are not what this version of drizzle has (its `pg` query config's name
 * and types).
 */
export function direct<T extends PgPreparedQuery<PreparedQueryConfig>>(statement: T): T {
  const prepared = statement as unknown as PreparedInternals;
  const { client, queryString, queryConfig, fields } = prepared;
  if (!fields || prepared.customResultMapper || fields.some(({ path }) => path.length !== 1)) return statement;
  if (!is(prepared.logger, NoopLogger) || (prepared.cache !== undefined && !is(prepared.cache, NoopCache))) return statement;
  const onPglite = is(statement, PglitePreparedQuery);
  if (!onPglite && (!queryConfig.name || typeof queryConfig.types?.getTypeParser !== 'function')) return statement;
  const keys = fields.map(({ path }) => path[0]!);
  const decoders = fields.map(({ field }) => decoderOf(field));
  const mapRow = (values: unknown[]) => {
    const row: Record<string, unknown> = {};
    for (let i = 0; i < keys.length; i++) {
      const value = values[i];
      row[keys[i]!] = value === null ? null : decoders[i]!.mapFromDriverValue(value);
    }
    return row;
  };
  let rowsOf: (params: unknown[]) => Promise<unknown[][]>;
  if (onPglite) {
    rowsOf = async (params) => (await client.query(queryString, params, queryConfig)).rows;
  } else {
    const named = new NamedStatement(queryConfig.name!, queryString, queryConfig.types!);
    rowsOf = (params) => named.run(client, params);
  }
  (statement as { execute: unknown }).execute = async (placeholders: Record<string, unknown> = {}) => {
    const params = fillPlaceholders(prepared.params, placeholders);
    let rows: unknown[][];
    try {
      rows = await rowsOf(params);
    } catch (error) {
      throw new DrizzleQueryError(queryString, params, error as Error);
    }
    return rows.map(mapRow);
  };
  return statement;
}
