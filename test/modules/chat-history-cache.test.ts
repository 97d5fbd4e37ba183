import { describe, expect, it } from 'vitest';
import { type ExtendedHistory, HistoryCache, type StoredHistoryMessage } from '../../src/modules/chat/history-cache.js';
import { messagesWire } from '../../src/providers/wire-messages.js';
import { reachableBufferBytes, reachableHeapBytes } from '../support/heap.js';

const message = (id: number, content = `message ${id}`): StoredHistoryMessage => ({ id: String(id), role: 'user', content, replyTo: null, tokens: 3, encoding: 'o200k_base' });
/** Messages `from` down to `to`, newest first, as pages are read. */
const newestFirst = (from: number, to: number) => Array.from({ length: from - to + 1 }, (_, i) => message(from - i));
const ids = (messages: StoredHistoryMessage[] | undefined) => messages?.map((m) => Number(m.id));
/** The whole history a turn's page and the cache make together. */
const whole = (known: ExtendedHistory | undefined) => known && [...known.newer, ...known.cached.messages];

describe('HistoryCache', () => {
  it('puts the newer messages of the page before the cached history that it lines up with', () => {
    const cache = new HistoryCache(1024 * 1024);
    cache.remember('p', { messages: newestFirst(100, 1), complete: true, revision: 0 }, cache.version);
    const known = cache.extend('p', newestFirst(102, 39), 0);
    expect(ids(whole(known))).toEqual(ids(newestFirst(102, 1)));
    expect(known?.cached.complete).toBe(true);
  });

  it('misses a project it holds nothing of, a page without the cached newest message, and one that differs past it', () => {
    const cache = new HistoryCache(1024 * 1024);
    cache.remember('p', { messages: newestFirst(100, 1), complete: false, revision: 0 }, cache.version);
    expect(cache.extend('q', newestFirst(100, 37), 0)).toBeUndefined();
    // Cleared, then written again: the cached newest message is gone.
    expect(cache.extend('p', newestFirst(300, 237), 0)).toBeUndefined();
    // A message stored among the cached ones (another instance's clock behind): 99.5 between 100 and 99.
    const page = [message(101), message(100), { ...message(995), id: '99.5' }, ...newestFirst(99, 39)];
    expect(cache.extend('p', page, 0)).toBeUndefined();
    // A stored message changed since it was read (a question marked failed, by another instance too).
    expect(cache.extend('p', newestFirst(101, 38), 1)).toBeUndefined();
    expect(ids(whole(cache.extend('p', newestFirst(101, 38), 0)))).toEqual(ids(newestFirst(101, 1)));
  });

  it('keeps nothing read before a history was forgotten: it may hold the message forgotten for', () => {
    const cache = new HistoryCache(1024 * 1024);
    cache.remember('p', { messages: newestFirst(100, 1), complete: true, revision: 0 }, cache.version);
    const readBefore = cache.version;
    cache.forget('p');
    expect(cache.extend('p', newestFirst(100, 37), 0)).toBeUndefined();
    // A turn that read before the forget, and remembers after it, keeps nothing; one that read after it does.
    cache.remember('p', { messages: newestFirst(100, 1), complete: true, revision: 0 }, readBefore);
    expect(cache.extend('p', newestFirst(100, 37), 0)).toBeUndefined();
    cache.remember('p', { messages: newestFirst(99, 1), complete: true, revision: 0 }, cache.version);
    expect(ids(whole(cache.extend('p', newestFirst(100, 37), 0)))).toEqual(ids(newestFirst(100, 1)));
  });

  it('keeps at most its bytes, the least recently used projects going first', () => {
    // 100 messages of about 230 bytes: 23 KB a project, room for two.
    const cache = new HistoryCache(50_000);
    for (const project of ['a', 'b']) cache.remember(project, { messages: newestFirst(100, 1), complete: true, revision: 0 }, cache.version);
    expect(cache.extend('a', newestFirst(100, 37), 0)).toBeDefined(); // a is now the most recently used
    cache.remember('c', { messages: newestFirst(100, 1), complete: true, revision: 0 }, cache.version);
    expect(cache.extend('b', newestFirst(100, 37), 0)).toBeUndefined();
    expect(cache.extend('a', newestFirst(100, 37), 0)).toBeDefined();
    expect(cache.extend('c', newestFirst(100, 37), 0)).toBeDefined();
    // A history larger than the whole cache is not kept, and what it replaces is dropped.
    cache.remember('a', { messages: newestFirst(100, 1).map((m) => message(Number(m.id), 'x'.repeat(1_000))), complete: true, revision: 0 }, cache.version);
    expect(cache.extend('a', newestFirst(100, 37), 0)).toBeUndefined();
    expect(cache.extend('c', newestFirst(100, 37), 0)).toBeDefined();
  });
});

describe('HistoryCache bytes of a continued history', () => {
  // The bytes of a history that continues a cached one are counted by what changed: were they counted
  // wrong, in either direction, a project that must stay would go, or one that must go would stay.
  it('counts a history continued turn after turn as the same history counted whole', () => {
    // 100 messages of about 230 bytes: 23 KB a project, room for two.
    const cache = new HistoryCache(50_000);
    cache.remember('a', { messages: newestFirst(100, 1), complete: false, revision: 0 }, cache.version);
    cache.remember('b', { messages: newestFirst(100, 1), complete: false, revision: 0 }, cache.version);
    // Each turn two newer messages and the two oldest dropped; every other turn, one more dropped and an
    // older one read after the cached ones (as a page read from the database): 'a' stays as large.
    for (let newest = 102; newest <= 1_000; newest += 2) {
      const known = cache.extend('a', newestFirst(newest, newest - 63), 0)!;
      expect(ids(known.newer)).toEqual([newest, newest - 1]);
      const older = newest % 4 ? [] : [message(-newest)];
      const kept = known.cached.messages.length - 2 - older.length;
      const messages = [...known.newer, ...known.cached.messages.slice(0, kept), ...older];
      cache.remember('a', { messages, complete: false, revision: 0 }, cache.version, { cached: known.cached, from: 2, kept });
    }
    expect(cache.extend('b', newestFirst(100, 37), 0)).toBeDefined();
    // A third project takes the room of the least recently used, 'a': 'b' stays, as it would were 'a' counted whole.
    cache.remember('c', { messages: newestFirst(100, 1), complete: false, revision: 0 }, cache.version);
    expect(cache.extend('a', newestFirst(1_000, 937), 0)).toBeUndefined();
    expect(cache.extend('b', newestFirst(100, 37), 0)).toBeDefined();
    expect(cache.extend('c', newestFirst(100, 37), 0)).toBeDefined();
  });
});

describe('HistoryCache memory', () => {
  /**
   * What the cache and the wire forms of its messages keep, under 32 MB: 80 projects of messages of
   * `text(seed)`, each sending a window of 200 of them, then the same window moved on over 20 turns,
   * then, shrunk to its newest 100 (a file taking the room), 3 turns more.
   */
  function kept(text: (seed: number) => string): number {
    const maxBytes = 32 * 1024 * 1024;
    const cache = new HistoryCache(maxBytes);
    // In a function of its own: what a project's turns leave behind (the messages the window left, which
    // keep what they were sent from) is not held by this frame when what is kept is measured.
    const turns = (project: number) => {
      const stored = Array.from({ length: 246 }, (_, i) => message(project * 1_000 + i, text(project * 1_000 + i)));
      const turn = (end: number, length: number) => {
        const window = stored.slice(end - length, end);
        // What a turn sends of it (providers/openai-compatible.ts sends these parts), between its prompt and question.
        messagesWire([{ role: 'system', content: 'be brief' }, ...window, { role: 'user', content: text(project) }]);
        cache.remember(`p${project}`, { messages: window.reverse(), complete: false, revision: 0 }, cache.version);
      };
      for (let end = 200; end <= 240; end += 2) turn(end, 200);
      for (let end = 242; end <= 246; end += 2) turn(end, 100);
    };
    const before = reachableHeapBytes() + reachableBufferBytes();
    for (let project = 0; project < 80; project++) turns(project);
    // A little over the bound for what the estimate cannot know (object headers, the map), not half again as much.
    return (reachableHeapBytes() + reachableBufferBytes() - before) / maxBytes;
  }
  const characters = (codes: readonly number[]) => (seed: number) =>
    Array.from({ length: 1_000 }, (_, i) => String.fromCharCode(codes[(seed * 7 + i * 37) % codes.length]!)).join('');

  it('keeps what it holds, the messages and the wire form a turn made of them, within its bytes, in any script', () => {
    // Chinese text: each character one UTF-16 unit, two bytes in the string and three in UTF-8.
    expect(kept(characters(Array.from({ length: 20_000 }, (_, i) => 0x4e00 + i)))).toBeLessThan(1.15);
  });

  it('keeps within its bytes text that JSON escapes (control characters: six bytes each in the wire form)', () => {
    // Not \b \t \n \f \r, which JSON writes in two.
    expect(kept(characters([1, 2, 3, 4, 5, 6, 7, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]))).toBeLessThan(1.15);
  });
});
