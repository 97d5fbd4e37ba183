import { validate, version } from 'uuid';
import { describe, expect, it } from 'vitest';
import { uuidv7 } from '../../src/db/ids.js';

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
