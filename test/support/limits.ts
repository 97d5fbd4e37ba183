import { expect } from 'vitest';
import { expectProblem } from './app.js';

type Response = { statusCode: number; headers: Record<string, unknown>; json(): unknown };

/** Asserts the 409 of a create over a count limit, its detail naming the limit and its variable. */
export function expectLimitReached(response: Response, detail: string): void {
  expect(expectProblem(response, 409, 'CONFLICT').detail).toBe(detail);
}

/**
 * Sends `count` creates at once and returns their statuses, sorted: with one slot left, exactly one
 * must be 201 and every other 409, whatever order the database takes them in.
 */
export async function statusesOfCreatesAtOnce(count: number, create: () => Promise<{ statusCode: number }>): Promise<number[]> {
  const responses = await Promise.all(Array.from({ length: count }, create));
  return responses.map((response) => response.statusCode).sort();
}

export const oneCreatedTheRestRefused = (count: number) => [201, ...Array<number>(count - 1).fill(409)];
