/** One event of a `text/event-stream`: its `event` field (undefined for the default type) and its data. */
export interface SseEvent {
  event: string | undefined;
  data: string;
}

const LF = 10;
const CR = 13;
const COLON = 58;
const SPACE = 32;
const BOM = 0xfeff;

/**
 * Server-sent events (WHATWG HTML, "Interpreting an event stream") from text that arrives in pieces of
 * any size. Lines end in CRLF, LF or CR; the `data` lines of one event are joined with LF; comments,
 * `id`, `retry` and unknown fields are skipped, as is a byte order mark that starts the stream; an
 * event is dispatched at the blank line that ends it, and one the stream ends before is dropped. Synchronous, an array per piece: a stream's chunks pass
 * through no promise of their own on their way to the reader.
 */
export class SseDecoder {
  private rest = '';
  private data: string | undefined;
  private event: string | undefined;
  private started = false;

  /** The events that `text` completes, in order. */
  push(text: string): SseEvent[] {
    const events: SseEvent[] = [];
    let piece = text;
    if (!this.started && piece !== '') {
      this.started = true;
      // Left in, it would make the first line's field unknown, and its event (a first delta) lost.
      if (piece.charCodeAt(0) === BOM) piece = piece.slice(1);
    }
    const buffer = this.rest === '' ? piece : this.rest + piece;
    let start = 0;
    // Where the next CR is, looked up again only once passed: most streams end lines in LF alone, and
    // a lookup per line would scan the rest of the piece each time.
    let nextCR = buffer.indexOf('\r');
    for (;;) {
      if (nextCR !== -1 && nextCR < start) nextCR = buffer.indexOf('\r', start);
      const nextLF = buffer.indexOf('\n', start);
      const end = nextCR === -1 ? nextLF : nextLF === -1 ? nextCR : Math.min(nextCR, nextLF);
      if (end === -1) break;
      let next = end + 1;
      if (buffer.charCodeAt(end) === CR) {
        // A CR that ends the piece may be the first half of a CRLF: the line waits for the next piece.
        if (next === buffer.length) break;
        if (buffer.charCodeAt(next) === LF) next++;
      }
      this.line(buffer.slice(start, end), events);
      start = next;
    }
    this.rest = start === buffer.length ? '' : buffer.slice(start);
    return events;
  }

  private line(line: string, events: SseEvent[]): void {
    if (line === '') {
      if (this.data) events.push({ event: this.event, data: this.data });
      this.data = undefined;
      this.event = undefined;
      return;
    }
    if (line.charCodeAt(0) === COLON) return; // a comment
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    if (field !== 'data' && field !== 'event') return;
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.charCodeAt(0) === SPACE) value = value.slice(1);
    if (field === 'event') this.event = value;
    else this.data = this.data === undefined ? value : `${this.data}\n${value}`;
  }
}
