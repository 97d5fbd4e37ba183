import { z } from 'zod';
import { invalidPart, ValidationFailed } from './errors.js';

const DEFAULT_PAGE_SIZE = 20;
const MAX_PAGE_SIZE = 100;

/** The sort key of a row as the list orders it; the cursor carries the key of a page's last row. */
export type SortKey = readonly string[];

/** Sort key of lists ordered by id alone (uuid v7 ids are time-ordered): projects, prompts. */
export const idSortKey = z.tuple([z.uuid()]);
export type IdSortKey = z.infer<typeof idSortKey>;
export const idSortKeyOf = (row: { id: string }): IdSortKey => [row.id];

/**
 * Sort key of lists ordered by (created_at, id), the order of their index: messages, files. The time is
 * carried as microseconds since the epoch: a Date keeps only milliseconds, and a cursor cut to them
 * would return the rows of its last millisecond again.
 */
export const timeSortKey = z.tuple([z.string().regex(/^-?\d{1,16}$/), z.uuid()]);
export type TimeSortKey = z.infer<typeof timeSortKey>;

/**
 * The list a cursor was handed out for: what it lists and whose (`projects:<userId>`,
 * `prompts:<projectId>`). A cursor of another list, given back to this one, walked it from wherever its
 * key fell among this list's rows, skipping the rows before it without a word.
 */
export type ListName = string;

const NOT_A_CURSOR = 'is not a cursor of this list';

/** Opaque to clients: base64url JSON of the list's name and the sort key, checked on the way back in. */
export function encodeCursor(list: ListName, key: SortKey): string {
  return Buffer.from(JSON.stringify([list, ...key])).toString('base64url');
}

function decodeCursor(cursor: string): unknown {
  try {
    return JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
  } catch {
    return undefined;
  }
}

// Query values arrive as strings; only plain digits are a limit ('1.5', '1e1', ' 5' and '0x10' are not).
// The document says what a client sends, an integer, not the pattern its text is read with.
const limit = z
  .string()
  .regex(/^\d{1,3}$/, { message: `must be an integer from 1 to ${MAX_PAGE_SIZE}` })
  .meta({
    description: `Items a page: an integer from 1 to ${MAX_PAGE_SIZE} (${DEFAULT_PAGE_SIZE} without it)`,
    type: 'integer',
    minimum: 1,
    maximum: MAX_PAGE_SIZE,
    default: DEFAULT_PAGE_SIZE,
    pattern: undefined,
  })
  .transform(Number)
  .pipe(z.number().min(1).max(MAX_PAGE_SIZE))
  .default(DEFAULT_PAGE_SIZE);

/**
 * `?limit&cursor` of a list whose sort key has the shape `sortKey`. A cursor that does not decode to a
 * list's name and that shape fails validation (400 on `querystring.cursor`) before any query sees it;
 * one of another list, once `paginate` knows which list this is.
 */
export function pageQuery<Key extends SortKey>(sortKey: z.ZodType<Key>) {
  const cursor = z
    .string()
    .max(512)
    .transform((value, ctx) => {
      const decoded = decodeCursor(value);
      const [list, ...key] = Array.isArray(decoded) ? (decoded as unknown[]) : [];
      const parsed = sortKey.safeParse(key);
      if (typeof list === 'string' && parsed.success) return { list, key: parsed.data };
      ctx.addIssue({ code: 'custom', message: NOT_A_CURSOR });
      return z.NEVER;
    });
  return z.strictObject({ limit, cursor: cursor.optional() });
}

export interface PageRequest<Key extends SortKey> {
  limit: number;
  cursor?: { list: ListName; key: Key } | undefined;
}

export interface Page<T> {
  data: T[];
  nextCursor: string | null;
}

/** The response schema of a list of `item`. */
export function pageOf<Item extends z.ZodType>(item: Item) {
  return z.object({ data: z.array(item), nextCursor: z.string().nullable() });
}

/**
 * One page of the keyset-paginated list `list`. `fetchRows(after, take)` reads up to `take` rows whose
 * sort key comes after `after`, in order; one row more than the limit is read only to learn whether a next
 * page exists. Keyset (not offset) paging returns every row exactly once while rows are being added.
 * A cursor of another list is 400.
 */
export async function paginate<Row, Key extends SortKey>(
  request: PageRequest<Key>,
  list: ListName,
  fetchRows: (after: Key | undefined, take: number) => Promise<Row[]>,
  sortKeyOf: (row: Row) => Key,
): Promise<Page<Row>> {
  const { cursor } = request;
  if (cursor && cursor.list !== list) throw new ValidationFailed(invalidPart('querystring'), [{ path: 'querystring.cursor', message: NOT_A_CURSOR }]);
  const rows = await fetchRows(cursor?.key, request.limit + 1);
  if (rows.length <= request.limit) return { data: rows, nextCursor: null };
  const data = rows.slice(0, request.limit);
  return { data, nextCursor: encodeCursor(list, sortKeyOf(data.at(-1)!)) };
}
