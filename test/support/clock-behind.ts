import type { FastifyInstance } from 'fastify';
import { expect, vi } from 'vitest';

/** A list of rows ordered by their ids (a user's projects, a project's prompts), created and changed through the API. */
export interface RowsUnderParent {
  app: FastifyInstance;
  /** The caller's, owning the parent. */
  headers: Record<string, string>;
  /** The list's path: a POST creates under it, a PATCH of `<list>/<id>` changes a row. */
  list: string;
  /** A create's body, and a change's. */
  create: object;
  change: object;
}

interface Timed {
  id: string;
  createdAt: string;
  updatedAt: string;
}

/**
 * Rows created and changed on an instance whose clock is an hour behind another's (or after a clock was
 * set back) have times that agree with the list's order: each row's `createdAt` no earlier than the one
 * listed before it, each change's `updatedAt` later than the version before.
 */
export async function expectTimesInListOrder(rows: RowsUnderParent): Promise<void> {
  const send = (method: 'GET' | 'POST' | 'PATCH', url: string, payload?: object) =>
    rows.app.inject({ method, url, headers: rows.headers, ...(payload ? { payload } : {}) });
  const created = async () => {
    const response = await send('POST', rows.list, rows.create);
    expect(response.statusCode).toBe(201);
    return response.json() as Timed;
  };
  const first = await created();
  vi.useFakeTimers({ toFake: ['Date'], now: Date.now() - 3_600_000 });
  try {
    const second = await created();
    const listed = (await send('GET', rows.list)).json().data as Timed[];
    expect(listed.map((row) => row.id)).toEqual([first.id, second.id]);
    expect(Date.parse(second.createdAt)).toBeGreaterThanOrEqual(Date.parse(first.createdAt));
    expect(second.updatedAt).toBe(second.createdAt);
    const changed = (await send('PATCH', `${rows.list}/${first.id}`, rows.change)).json() as Timed;
    expect(changed.createdAt).toBe(first.createdAt);
    expect(Date.parse(changed.updatedAt)).toBeGreaterThanOrEqual(Date.parse(first.updatedAt));
  } finally {
    vi.useRealTimers();
  }
}
