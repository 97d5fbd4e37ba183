import { writeSync } from 'node:fs';
import { type DestinationStream, destination } from 'pino';

/** The most log text held in memory while standard output takes it slower than it is written; past it, lines are dropped. */
const MAX_UNWRITTEN_LOG_BYTES = 16 * 1024 * 1024;
/** The most text handed to sonic-boom at once: its own largest write. Past its bound it drops what it is handed whole. */
const MAX_PIECE = 16 * 1024;
/** How long the lines left at exit may wait for a reader that takes them slower (a full pipe): a while, not for ever. */
const EXIT_WAIT_MS = 1_000;
const EXIT_RETRY_MS = 10;

let output: LinesOfATurn | undefined;

/**
 * Standard output for the log: one per process, however many apps log to it (the tests build many).
 * Asynchronous, as pino's default writes it, the lines of a turn of the event loop in one write, the
 * rest written as the process exits; bounded: a reader of the log slower than the service (a stalled
 * pipe) holds up to MAX_UNWRITTEN_LOG_BYTES, not the whole log. And once a write fails (a full disk),
 * the log stops, said once on standard error: pino stops only on a closed pipe, re-raised any other
 * failure as an error that ended the process, and its last flush as it exited retried the write for ever.
 */
export function standardOutput(): DestinationStream {
  return (output ??= new LinesOfATurn());
}

/**
 * The lines logged in one turn of the event loop, handed to sonic-boom together once the turn is done.
 * sonic-boom makes a system call, a copy and two events of every text it is given: line by line, on a
 * loaded server, that cost as much as making the line (a request's answer at `info`).
 */
class LinesOfATurn implements DestinationStream {
  private readonly stream = destination({ dest: 1, sync: false, maxLength: MAX_UNWRITTEN_LOG_BYTES });
  private lines: string[] = [];
  private length = 0;
  private stopped = false;

  constructor() {
    this.stream.on('error', (error: Error) => {
      if (this.stopped) return;
      this.stopped = true;
      this.take();
      const stopped = () => undefined;
      Object.assign(this.stream, { write: stopped, flushSync: stopped, flush: stopped, end: stopped });
      process.stderr.write(`the log stopped: standard output failed (${error.message})\n`);
    });
    // Ended by pino as the event loop emptied: a line logged after (from a `beforeExit` handler) has nowhere to go.
    this.stream.on('close', () => {
      this.stopped = true;
    });
    // pino's own hook has flushed what sonic-boom holds by then (it was registered first): the last
    // turn's lines follow, written at once. Handed to sonic-boom, they would be one asynchronous write,
    // of which a pipe takes 64 KB before the process is gone.
    process.on('exit', () => {
      if (!this.stopped && this.lines.length) writeBeforeExit(this.take().join(''));
    });
  }

  write(line: string): void {
    if (this.stopped || this.length + line.length > MAX_UNWRITTEN_LOG_BYTES) return;
    this.length += line.length;
    if (this.lines.push(line) === 1) setImmediate(this.hand);
  }

  /** pino's `logger.flush`: what this holds, then what sonic-boom does. */
  flush(done?: (error?: Error) => void): void {
    this.hand();
    this.stream.flush(done);
  }

  /** In pieces no larger than sonic-boom's own writes: past its bound it drops a piece, not a whole turn. */
  private readonly hand = (): void => {
    if (this.stopped) return;
    let piece = '';
    for (const line of this.take()) {
      if (piece.length + line.length > MAX_PIECE && piece) {
        this.stream.write(piece);
        piece = '';
      }
      piece += line;
    }
    if (piece) this.stream.write(piece);
  };

  private take(): string[] {
    const { lines } = this;
    this.lines = [];
    this.length = 0;
    return lines;
  }
}

/** Writes `text` to standard output before the process ends, waiting up to EXIT_WAIT_MS for a non-blocking pipe that is full. */
function writeBeforeExit(text: string): void {
  let bytes = Buffer.from(text);
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (let waited = 0; bytes.length > 0; ) {
    try {
      bytes = bytes.subarray(writeSync(1, bytes));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EAGAIN' || waited >= EXIT_WAIT_MS) return;
      Atomics.wait(pause, 0, 0, EXIT_RETRY_MS);
      waited += EXIT_RETRY_MS;
    }
  }
}
