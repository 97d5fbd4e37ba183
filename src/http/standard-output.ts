import { fstatSync, write, writeSync } from 'node:fs';
import type { DestinationStream } from 'pino';

/**
 * The most log text held in memory while standard output takes it slower than it is written; past it,
 * lines are dropped. Counted in characters (UTF-16 units) while the lines wait, in bytes once a write
 * has encoded them: a byte a character for the ASCII that nearly all of a log is, up to three for other
 * text (CJK), so up to 48 MiB then. A line's own byte length is not taken: it walked every piece the line
 * was made of.
 */
const MAX_UNWRITTEN_LOG = 16 * 1024 * 1024;
/** How soon a write that a full pipe refused (EAGAIN) is tried again. */
const RETRY_MS = 10;
/** How long the lines left at exit may wait for a reader that takes them slower (a full pipe): a while, not for ever. */
const EXIT_WAIT_MS = 1_000;
/** What a synchronous write waits on, for RETRY_MS, before it tries a full pipe again. */
const PAUSE = new Int32Array(new SharedArrayBuffer(4));

let output: StandardOutput | undefined;

/** Standard output for the log: one per process, however many apps log to it (the tests build many). */
export function standardOutput(): DestinationStream {
  return (output ??= new StandardOutput(1));
}

/**
 * The log's writer: the lines logged in one turn of the event loop go out in one write, made once the
 * turn is done. To a regular file, at once, as Node's own `process.stdout` writes a file: a file takes a
 * write into the page cache without waiting for a reader, and a write handed to the thread pool cost
 * two thread switches a request (with the service's threads on one core, as the bench pins them: 0.2
 * ms of a sequential chat's added latency at the median, figure 3). A disk that stalls its writes then
 * stalls the service (README, Production). To anything else (a pipe, a terminal, a socket),
 * asynchronously (a pipe's reader may be slow) and bounded: a reader slower than the
 * service (a stalled pipe) holds up to MAX_UNWRITTEN_LOG, not the whole log; past it, lines are
 * dropped. As the process exits, what is left is written at once, waiting up to EXIT_WAIT_MS for a full
 * pipe. Once a write fails (a full disk, a closed pipe), the log stops, said once on standard error.
 *
 * In place of pino's own (sonic-boom): a system call, a copy and two events for every line it was
 * given, which on a loaded server cost as much as making the line; at exit, a piece that a full pipe had
 * refused and that waited to be tried again was lost, and its final flush waited for ever on a stalled
 * reader, or on a full disk until its error had been reported.
 */
class StandardOutput implements DestinationStream {
  /** Lines not yet handed to a write. */
  private lines: string[] = [];
  /** The characters of the text in `lines` plus the bytes of `unwritten`: a line that would take it past MAX_UNWRITTEN_LOG is dropped. */
  private held = 0;
  /** Not to a file: the bytes of the write under way not written yet, handed to the system or waiting to be tried again. */
  private unwritten: Buffer | undefined;
  /** Not to a file: the system has `unwritten` (a write on libuv's thread pool), and only its callback says how much went out. */
  private inFlight = false;
  private scheduled = false;
  private stopped = false;
  private readonly toFile: boolean;

  constructor(private readonly fd: number) {
    this.toFile = isRegularFile(fd);
    process.on('exit', () => this.writeAtExit());
  }

  write(line: string): void {
    if (this.stopped) return;
    if (this.held + line.length > MAX_UNWRITTEN_LOG) return;
    this.held += line.length;
    this.lines.push(line);
    // A write under way takes what came meanwhile once it is done.
    if (!this.scheduled && !this.unwritten) {
      this.scheduled = true;
      setImmediate(this.writeLines);
    }
  }

  private readonly writeLines = (): void => {
    this.scheduled = false;
    if (this.stopped || this.unwritten || this.lines.length === 0) return;
    if (this.toFile) this.writeToFile(this.takeLines());
    else {
      this.unwritten = this.takeLines();
      this.send();
    }
  };

  private writeToFile(bytes: Buffer): void {
    try {
      this.writeNow(bytes);
    } catch (error) {
      return this.stop(error as NodeJS.ErrnoException);
    }
    this.held -= bytes.length;
  }

  private send(): void {
    const bytes = this.unwritten!;
    this.inFlight = true;
    write(this.fd, bytes, 0, bytes.length, null, (error, written) => {
      this.inFlight = false;
      if (this.stopped) return;
      if (error?.code === 'EAGAIN') {
        setTimeout(() => this.send(), RETRY_MS).unref();
        return;
      }
      if (error) return this.stop(error);
      this.held -= written;
      this.unwritten = written < bytes.length ? bytes.subarray(written) : undefined;
      if (this.unwritten) this.send();
      else this.writeLines();
    });
  }

  private takeLines(): Buffer {
    const text = this.lines.join('');
    this.lines = [];
    const bytes = Buffer.from(text);
    this.held += bytes.length - text.length;
    return bytes;
  }

  private stop(error: NodeJS.ErrnoException): void {
    this.stopped = true;
    this.lines = [];
    this.unwritten = undefined;
    process.stderr.write(`the log stopped: standard output failed (${error.message})\n`);
  }

  /**
   * What is left, written at once. A write that the system still has (on the thread pool) may finish
   * after these lines, or be cut short as the process ends: only its callback would tell, and none runs
   * now. One waiting to be tried again is written first.
   */
  private writeAtExit(): void {
    if (this.stopped) return;
    try {
      this.writeNow(Buffer.concat([this.inFlight || !this.unwritten ? Buffer.alloc(0) : this.unwritten, this.takeLines()]));
    } catch {
      // The process is ending: the lines are lost, as they would be with nobody to read them.
    }
  }

  /**
   * Writes `bytes` whole before returning, waiting up to EXIT_WAIT_MS in all for a full pipe (a file
   * never refuses a write that way); any other failure is thrown.
   */
  private writeNow(bytes: Buffer): void {
    for (let waited = 0; bytes.length > 0; ) {
      try {
        bytes = bytes.subarray(writeSync(this.fd, bytes));
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EAGAIN' || waited >= EXIT_WAIT_MS) throw error;
        Atomics.wait(PAUSE, 0, 0, RETRY_MS);
        waited += RETRY_MS;
      }
    }
  }
}

function isRegularFile(fd: number): boolean {
  try {
    return fstatSync(fd).isFile();
  } catch {
    return false; // closed: the first write says so, and the log stops
  }
}
