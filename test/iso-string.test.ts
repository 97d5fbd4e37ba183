import { describe, expect, it } from 'vitest';
import { isoString } from '../src/iso-string.js';

describe('isoString', () => {
  it('writes what toISOString writes, at the edges of its fields', () => {
    const edges = [
      '1000-01-01T00:00:00.000Z',
      '1970-01-01T00:00:00.000Z',
      '1999-12-31T23:59:59.999Z',
      '2000-02-29T12:00:00.001Z',
      '2024-02-29T23:59:59.010Z',
      '2026-12-07T00:31:44.123Z',
      '2100-03-01T09:05:07.100Z',
      '9999-12-31T23:59:59.999Z',
    ];
    for (const edge of edges) expect(isoString(new Date(edge))).toBe(edge);
  });

  it('writes what toISOString writes, for any time of the years 1000–9999', () => {
    const from = Date.UTC(1000, 0, 1);
    const to = Date.UTC(9999, 11, 31, 23, 59, 59, 999);
    for (let i = 0; i < 20_000; i++) {
      const date = new Date(from + Math.floor(Math.random() * (to - from)));
      expect(isoString(date)).toBe(date.toISOString());
    }
  });

  it("leaves the other years, and an invalid date's RangeError, to toISOString", () => {
    for (const date of [new Date('0999-12-31T23:59:59.999Z'), new Date(Date.UTC(10_000, 0, 1)), new Date(Date.UTC(-1, 5, 1)), new Date(-8.64e15)]) {
      expect(isoString(date)).toBe(date.toISOString());
    }
    expect(() => isoString(new Date(Number.NaN))).toThrow(RangeError);
  });
});
