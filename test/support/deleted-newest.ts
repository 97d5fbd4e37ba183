import type { FastifyInstance } from 'fastify';
import { expect } from 'vitest';

/** A list of rows under a parent (a user's projects, a project's prompts and files), created and deleted through the API. */
export interface ListUnderParent {
  app: FastifyInstance;
  /** The caller's, owning the parent. */
  headers: Record<string, string>;
  /** The list's path: a POST creates under it, a DELETE of `<list>/<id>` deletes. */
  list: string;
  /** Stores, by hand, a row whose list key is an hour ahead of the clock (made before the clock was set back); its id. */
  insertAhead(): Promise<string>;
  /** The create's request: a JSON body, or a form with its Content-Type header. */
  create(): { payload: object | Buffer; headers?: Record<string, string> };
}

/**
 * A row created after the newest rows were deleted is listed to a walk that had reached them, though the
 * clock is behind their keys: its key comes after every key made under the parent, not only after
 * those of the rows still there. The walk holds a cursor at the row made ahead of the clock; it and the
 * row created after it are deleted, and the row created next must follow the cursor.
 */
export async function expectCreateListedAfterDeletedNewest(rows: ListUnderParent): Promise<void> {
  const send = (method: 'GET' | 'POST' | 'DELETE', url: string, body?: { payload: object | Buffer; headers?: Record<string, string> }) =>
    rows.app.inject({ method, url, headers: { ...rows.headers, ...body?.headers }, ...(body ? { payload: body.payload } : {}) });
  const create = async () => {
    const response = await send('POST', rows.list, rows.create());
    expect(response.statusCode).toBe(201);
    return (response.json() as { id: string }).id;
  };
  const ahead = await rows.insertAhead();
  const after = await create();
  // The walk from the start, a row a page, up to the row made ahead: its cursor points there.
  let cursor: string | null = null;
  for (let seen = ''; seen !== ahead; ) {
    const page = (await send('GET', `${rows.list}?limit=1${cursor ? `&cursor=${cursor}` : ''}`)).json() as { data: { id: string }[]; nextCursor: string | null };
    seen = page.data[0]!.id;
    cursor = page.nextCursor;
  }
  expect(cursor).not.toBeNull();
  for (const id of [ahead, after]) expect((await send('DELETE', `${rows.list}/${id}`)).statusCode).toBe(204);
  const created = await create();
  const rest = (await send('GET', `${rows.list}?limit=10&cursor=${cursor}`)).json() as { data: { id: string }[] };
  expect(rest.data.map((row) => row.id)).toEqual([created]);
}
