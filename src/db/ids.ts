import { randomFillSync } from 'node:crypto';

/** Random bytes for this many ids are drawn at a time. */
const IDS_PER_DRAW = 256;
const random = Buffer.alloc(16 * IDS_PER_DRAW);
let drawn = random.length;
const id = Buffer.alloc(16);
let lastMs = -Infinity;
/** Orders the ids of one millisecond: random when the millisecond starts, then counted up. */
let sequence = 0;

/**
 * A new row id: a UUID version 7 (RFC 9562), whose first 48 bits are the Unix time in milliseconds, so
 * that rows are inserted in index order, and whose ids made in one millisecond by this process still
 * sort in the order they were made (a 32-bit counter, as the `uuid` package lays it out). The randomness
 * is drawn from the CSPRNG 4 KB at a time, as `crypto.randomUUID` does, instead of with a call for each
 * id: a turn makes its ids on the way to its first statement, and a call into the CSPRNG after the
 * process has idled measured here about 100 µs (docs/benchmarks.md).
 */
export function uuidv7(): string {
  if (drawn === random.length) {
    randomFillSync(random);
    drawn = 0;
  }
  const start = drawn;
  drawn += 16;
  const now = Date.now();
  if (now > lastMs) {
    lastMs = now;
    sequence = random.readUInt32BE(start + 6) & 0x7fffffff;
  } else {
    // The same millisecond, or a clock set back: count on from the last id.
    sequence = (sequence + 1) >>> 0;
    if (sequence === 0) lastMs++;
  }
  id.writeUIntBE(lastMs, 0, 6);
  id[6] = 0x70 | (sequence >>> 28);
  id[7] = (sequence >>> 20) & 0xff;
  id[8] = 0x80 | ((sequence >>> 14) & 0x3f);
  id[9] = (sequence >>> 6) & 0xff;
  id[10] = ((sequence << 2) & 0xff) | (random[start + 10]! & 0x03);
  random.copy(id, 11, start + 11, start + 16);
  const hex = id.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
