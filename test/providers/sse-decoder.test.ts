import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { type SseEvent, SseDecoder } from '../../src/providers/sse-decoder.js';

function decode(...pieces: string[]): SseEvent[] {
  const decoder = new SseDecoder();
  return pieces.flatMap((piece) => decoder.push(piece));
}

describe('SseDecoder', () => {
  it('reads the data and event of each event, at the blank line that ends it', () => {
    expect(decode('data: {"a":1}\n\nevent: error\ndata: {"b":2}\n\n')).toEqual([
      { event: undefined, data: '{"a":1}' },
      { event: 'error', data: '{"b":2}' },
    ]);
  });

  it('ends lines at CRLF, LF or CR alike', () => {
    expect(decode('data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\n')).toEqual(['a', 'b', 'c', 'd'].map((data) => ({ event: undefined, data })));
  });

  it('joins the data lines of one event with LF, and takes one space after the colon away', () => {
    expect(decode('data:one\ndata:  two\ndata\n\n')).toEqual([{ event: undefined, data: 'one\n two\n' }]);
  });

  it('skips comments, id, retry, unknown fields and events without data', () => {
    expect(decode(': keep-alive\nid: 7\nretry: 10\nunknown: x\ngarbage\n\nevent: ping\n\ndata:\n\ndata: kept\n\n')).toEqual([
      { event: undefined, data: 'kept' },
    ]);
  });

  it('takes away one byte order mark at the start of the stream, however it is cut, and keeps any other', () => {
    expect(decode('\ufeffdata: first\n\n\ufeffdata: second\n\n')).toEqual([{ event: undefined, data: 'first' }]);
    expect(decode('', '\ufeff', 'data: first\n\n')).toEqual([{ event: undefined, data: 'first' }]);
    expect(decode('data: \ufeffkept\n\n')).toEqual([{ event: undefined, data: '\ufeffkept' }]);
  });

  it('drops an event that the stream ends before its blank line', () => {
    expect(decode('data: whole\n\ndata: cut')).toEqual([{ event: undefined, data: 'whole' }]);
  });

  it('ends a line at a CR that ends a piece, and takes a LF that starts the next one for the rest of a CRLF', () => {
    const decoder = new SseDecoder();
    expect(decoder.push('data: a\r')).toEqual([]);
    expect(decoder.push('\n\r')).toEqual([{ event: undefined, data: 'a' }]);
    expect(decoder.push('\n')).toEqual([]);
    expect(decoder.push('data: b\n\n')).toEqual([{ event: undefined, data: 'b' }]);
  });

  it('reads a line of megabytes that arrives in small pieces', () => {
    // Joined and searched again with each piece, this line took minutes (the test's timeout is the
    // bound): an upstream that drips one large event would hold the event loop that long.
    const decoder = new SseDecoder();
    const piece = 'x'.repeat(256);
    const pieces = (4 * 1024 * 1024) / piece.length;
    const events = [decoder.push('data: ')];
    for (let i = 0; i < pieces; i++) events.push(decoder.push(piece));
    events.push(decoder.push('\n\n'));
    expect(events.flat()).toEqual([{ event: undefined, data: piece.repeat(pieces) }]);
  });

  it('reads the same events however the stream is cut into pieces', () => {
    const line = fc.oneof(
      fc.string({ unit: fc.constantFrom('a', ' ', ':', '{', '"') }).map((text) => `data: ${text}`),
      fc.constantFrom('', 'event: error', ': comment', 'id: 1', 'data'),
    );
    const stream = fc.tuple(fc.array(line, { maxLength: 30 }), fc.constantFrom('\n', '\r\n', '\r'));
    fc.assert(
      fc.property(stream, fc.array(fc.nat(), { maxLength: 10 }), ([lines, end], cuts) => {
        const text = lines.map((text) => text + end).join('');
        const at = [...new Set(cuts.map((cut) => cut % (text.length + 1)))].sort((a, b) => a - b);
        const pieces = [0, ...at].map((from, i) => text.slice(from, [...at, text.length][i]));
        expect(decode(...pieces)).toEqual(decode(text));
      }),
    );
  });
});
