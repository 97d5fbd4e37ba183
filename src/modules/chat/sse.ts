import type { ServerResponse } from 'node:http';
import { withFields } from '../../with-fields.js';

/**
 * A server-sent events stream on a raw response: numbered events, comment heartbeats while idle, and
 * backpressure (a slow client pauses the writer instead of growing a buffer). A client that reads
 * nothing for `stallMs` while an event waits is cut off: it would otherwise hold its connection, its
 * turn and the event for as long as it likes.
 */
export class EventStream {
  private nextId = 1;
  private heartbeat: NodeJS.Timeout | undefined;

  constructor(
    private readonly raw: ServerResponse,
    private readonly heartbeatMs: number,
    private readonly stallMs: number,
    /** The turn's interrupt (the app closes): from then on no event waits for the client (see `caughtUp`). */
    private readonly interrupt?: AbortSignal,
    /** Told when the client is cut off for taking nothing: the log's, as the close that follows looks like the client's own. */
    private readonly onStalled?: () => void,
  ) {}

  /** True once the client has gone or the stream was ended. */
  get closed(): boolean {
    return this.raw.writableEnded || this.raw.destroyed;
  }

  open(headers: Record<string, number | string | string[] | undefined>): void {
    this.raw.writeHead(
      200,
      withFields(headers, {
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache, no-transform',
        // Unless the server is stopping (SHUTDOWN_DELAY_MS), when the connection closes after the stream.
        connection: (headers.connection as string | undefined) ?? 'keep-alive',
        // Reverse proxies (nginx) must pass events through as they come.
        'x-accel-buffering': 'no',
      }),
    );
    // Not flushed on their own: they leave with the first event. Node's http holds what is written
    // until the next tick and sends it in one write, so the headers, `user_message` and a first delta
    // already there (the writes of one run of promise continuations) are one system call, not three.
    this.heartbeat = setInterval(() => this.write(': ping\n\n'), this.heartbeatMs);
    this.heartbeat.unref();
    this.raw.once('close', () => clearInterval(this.heartbeat));
  }

  /**
   * Writes one event; a promise only when the client has yet to take what was written, settled once it
   * has. A promise for every event would be one more for each delta of a stream (see `DeltaSink`).
   */
  send(event: string, data: unknown): Promise<void> | undefined {
    if (this.closed) return undefined;
    if (!this.write(`id: ${this.nextId++}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`)) return this.caughtUp();
    return undefined;
  }

  end(): void {
    clearInterval(this.heartbeat);
    if (!this.closed) this.raw.end();
  }

  /**
   * Resolves once the client has taken what was written (or is gone); cuts it off after `stallMs`. What
   * counts as taken is the kernel's to say: Linux makes a socket writable again once about a third of
   * what it holds for the client (its send buffer grows to `net.ipv4.tcp_wmem`'s maximum, 4 MiB on
   * Debian) has been read, so a client that has fallen that far behind is cut unless it reads that much
   * in `stallMs`. Its
   * listeners go with it: a slow client of a long answer waits here once an event, and listeners left
   * on the response each time would pile up until it closed. Once the turn is interrupted it resolves at
   * once, so that the turn stores what it has and queues its last event before the shutdown's bound; a
   * client that still takes nothing is cut off `stallMs` later all the same (the bound may come first).
   */
  private caughtUp(): Promise<void> {
    return new Promise((resolve) => {
      const stalled = setTimeout(() => {
        this.onStalled?.();
        this.raw.destroy();
      }, this.stallMs);
      const done = () => {
        clearTimeout(stalled);
        this.raw.off('drain', done).off('close', done);
        this.interrupt?.removeEventListener('abort', interrupted);
        resolve();
      };
      const interrupted = () => {
        this.interrupt?.removeEventListener('abort', interrupted);
        resolve();
      };
      this.raw.on('drain', done).on('close', done);
      if (this.interrupt?.aborted) interrupted();
      else this.interrupt?.addEventListener('abort', interrupted);
    });
  }

  private write(chunk: string): boolean {
    return this.closed ? true : this.raw.write(chunk);
  }
}
