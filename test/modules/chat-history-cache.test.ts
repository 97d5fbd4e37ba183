import { describe, expect, it } from 'vitest';
import { HistoryCache, type StoredHistoryMessage } from '../../src/modules/chat/history-cache.js';
import { messagesWire } from '../../src/providers/wire-messages.js';
import { reachableBufferBytes, reachableHeapBytes } from '../support/heap.js';

const message = (id: number, content = `message ${id}`): StoredHistoryMessage => ({ id: String(id), role: 'user', content, tokens: 3, encoding: 'o200k_base' });
/** Messages `from` down to `to`, newest first, as pages are read. */
const newestFirst = (from: number, to: number) => Array.from({ length: from - to + 1 }, (_, i) => message(from - i));
const ids = (messages: StoredHistoryMessage[] | undefined) => messages?.map((m) => Number(m.id));

describe('HistoryCache', () => {
  it('puts the newer messages of the page before the cached history that it lines up with', () => {
    const cache = new HistoryCache(1024 * 1024);
    cache.remember('p', { messages: newestFirst(100, 1), complete: true });
    const known = cache.extend('p', newestFirst(102, 39));
    expect(ids(known?.messages)).toEqual(ids(newestFirst(102, 1)));
    expect(known?.complete).toBe(true);
  });

  it('misses a project it holds nothing of, a page without the cached newest message, and one that differs past it', () => {
    const cache = new HistoryCache(1024 * 1024);
    cache.remember('p', { messages: newestFirst(100, 1), complete: false });
    expect(cache.extend('q', newestFirst(100, 37))).toBeUndefined();
    // Cleared, then written again: the cached newest message is gone.
    expect(cache.extend('p', newestFirst(300, 237))).toBeUndefined();
    // A message stored among the cached ones (another instance's clock behind): 99.5 between 100 and 99.
    const page = [message(101), message(100), { ...message(995), id: '99.5' }, ...newestFirst(99, 39)];
    expect(cache.extend('p', page)).toBeUndefined();
    expect(ids(cache.extend('p', newestFirst(101, 38))?.messages)).toEqual(ids(newestFirst(101, 1)));
  });

  it('keeps at most its bytes, the least recently used projects going first', () => {
    // 100 messages of about 230 bytes: 23 KB a project, room for two.
    const cache = new HistoryCache(50_000);
    for (const project of ['a', 'b']) cache.remember(project, { messages: newestFirst(100, 1), complete: true });
    expect(cache.extend('a', newestFirst(100, 37))).toBeDefined(); // a is now the most recently used
    cache.remember('c', { messages: newestFirst(100, 1), complete: true });
    expect(cache.extend('b', newestFirst(100, 37))).toBeUndefined();
    expect(cache.extend('a', newestFirst(100, 37))).toBeDefined();
    expect(cache.extend('c', newestFirst(100, 37))).toBeDefined();
    // A history larger than the whole cache is not kept, and what it replaces is dropped.
    cache.remember('a', { messages: newestFirst(100, 1).map((m) => message(Number(m.id), 'x'.repeat(1_000))), complete: true });
    expect(cache.extend('a', newestFirst(100, 37))).toBeUndefined();
    expect(cache.extend('c', newestFirst(100, 37))).toBeDefined();
  });
});

describe('HistoryCache memory', () => {
  it('keeps what it holds, the messages and the wire form a turn made of them, within its bytes, in any script', () => {
    const maxBytes = 32 * 1024 * 1024;
    const cache = new HistoryCache(maxBytes);
    // Chinese text: each character one UTF-16 unit, two bytes in the string and three in UTF-8.
    const text = (seed: number) => Array.from({ length: 1_000 }, (_, i) => String.fromCharCode(0x4e00 + ((seed * 7 + i * 37) % 20_000))).join('');
    const before = reachableHeapBytes() + reachableBufferBytes();
    for (let project = 0; project < 80; project++) {
      const history = Array.from({ length: 200 }, (_, i) => message(project * 1_000 + i, text(project * 1_000 + i)));
      cache.remember(`p${project}`, { messages: history, complete: true });
      // What a turn sends of it (providers/openai-compatible.ts joins these parts into its body).
      messagesWire(history);
    }
    const kept = reachableHeapBytes() + reachableBufferBytes() - before;
    // A little over the bound for what the estimate cannot know (object headers, the map), not half again as much.
    expect(kept).toBeLessThan(maxBytes * 1.15);
  });
});
