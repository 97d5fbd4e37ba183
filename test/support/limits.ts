import { expect } from 'vitest';
import { expectProblem } from './app.js';

type Response = { statusCode: number; headers: Record<string, unknown>; json(): unknown };

/** A holder (a user, a project) of rows under a count limit, as a test sees it. */
export interface Holder {
  max: number;
  /** The 409's detail, naming the limit and its variable. */
  detail: string;
  /** One create more under it. */
  create(): Promise<Response>;
  /** How many rows of the kind it holds in the database. */
  stored(): Promise<number>;
}

/** Asserts the 409 of a create over a count limit, its detail naming the limit and its variable. */
export function expectLimitReached(response: Response, detail: string): void {
  expect(expectProblem(response, 409, 'CONFLICT').detail).toBe(detail);
}

/** A full holder refuses one more with 409 and still holds exactly its limit. */
export async function expectFull(holder: Holder): Promise<void> {
  expectLimitReached(await holder.create(), holder.detail);
  expect(await holder.stored()).toBe(holder.max);
}

/** Deleting one row of a full holder frees one slot: one create succeeds, the next is refused again. */
export async function expectDeleteFreesOneSlot(holder: Holder, remove: () => Promise<{ statusCode: number }>): Promise<void> {
  expect((await remove()).statusCode).toBe(204);
  expect((await holder.create()).statusCode).toBe(201);
  await expectFull(holder);
}

/**
 * Sends ten creates at once to a holder with one slot left: exactly one is 201 and the nine others 409,
 * whatever order the database takes them in, and the holder is then full.
 */
export async function expectOneOfManyIntoTheLastSlot(holder: Holder): Promise<void> {
  const responses = await Promise.all(Array.from({ length: 10 }, () => holder.create()));
  expect(responses.map((response) => response.statusCode).sort()).toEqual([201, ...Array<number>(9).fill(409)]);
  expect(await holder.stored()).toBe(holder.max);
}
