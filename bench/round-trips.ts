import { once } from 'node:events';
import { connect, createServer, type NetConnectOpts, type Server, type Socket } from 'node:net';

/** Untyped messages a client may send before its startup message, each answered by one byte. */
const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const QUERY = 'Q'.charCodeAt(0);
const PARSE = 'P'.charCodeAt(0);
const BIND = 'B'.charCodeAt(0);
const SYNC = 'S'.charCodeAt(0);

/** One round trip to PostgreSQL: a simple query, or an extended-protocol exchange ended by Sync. */
export interface RoundTrip {
  sql: string;
}

/**
 * A TCP proxy in front of PostgreSQL that records every round trip its clients make, with the SQL it
 * carried. Point a server's DATABASE_URL at `url` to count what one request costs in database trips.
 */
export class RoundTripRecorder {
  readonly trips: RoundTrip[] = [];
  private readonly sockets = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    readonly url: string,
  ) {}

  static async start(databaseUrl: string): Promise<RoundTripRecorder> {
    const target = serverAddress(databaseUrl);
    const server = createServer();
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const proxied = new URL(databaseUrl);
    proxied.hostname = '127.0.0.1';
    proxied.port = String((server.address() as { port: number }).port);
    // The proxy reads the protocol in the clear: the client speaks to it over TCP, without TLS.
    for (const name of [...proxied.searchParams.keys()]) if (name === 'host' || name.startsWith('ssl')) proxied.searchParams.delete(name);
    const recorder = new RoundTripRecorder(server, proxied.toString());
    server.on('connection', (client) => {
      const upstream = connect(target);
      for (const socket of [client, upstream]) {
        recorder.sockets.add(socket);
        socket.on('close', () => recorder.sockets.delete(socket));
      }
      const scanner = new FrontendScanner((trip) => recorder.trips.push(trip));
      client.on('data', (chunk) => scanner.scan(chunk));
      client.pipe(upstream).pipe(client);
      client.on('error', () => upstream.destroy());
      upstream.on('error', () => client.destroy());
    });
    return recorder;
  }

  /** The round trips `work` causes (nothing else may use the proxied server meanwhile). */
  async during(work: () => Promise<unknown>): Promise<RoundTrip[]> {
    const from = this.trips.length;
    await work();
    return this.trips.slice(from);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      for (const socket of this.sockets) socket.destroy();
    });
  }
}

/**
 * Where a connection string's server listens: a TCP host and port, or a Unix socket when the host is a
 * directory, given as `?host=/var/run/postgresql` or percent-encoded in place of the host name.
 */
function serverAddress(databaseUrl: string): NetConnectOpts {
  const url = new URL(databaseUrl);
  // An IPv6 literal keeps its brackets in a URL, not in a connect() call.
  const host = url.searchParams.get('host') || decodeURIComponent(url.hostname).replace(/^\[(.*)\]$/, '$1');
  const port = Number(url.port || 5432);
  return host.startsWith('/') ? { path: `${host}/.s.PGSQL.${port}` } : { host, port };
}

/**
 * Reads the frontend side of the protocol: the untyped startup messages, then messages of a type byte
 * and a length. Parse and Query bodies are kept for their SQL, and Bind bodies for the name of the
 * prepared statement they run (named when it was parsed on this connection); every other body is skipped.
 */
class FrontendScanner {
  private startup = true;
  private header = Buffer.alloc(0);
  private remaining = 0;
  private type = 0;
  private body: Buffer[] | undefined;
  private pendingSql = '';
  private readonly prepared = new Map<string, string>();

  constructor(private readonly onTrip: (trip: RoundTrip) => void) {}

  scan(chunk: Buffer): void {
    let offset = 0;
    while (offset < chunk.length) {
      if (this.remaining > 0) {
        const part = chunk.subarray(offset, offset + this.remaining);
        this.body?.push(part);
        this.remaining -= part.length;
        offset += part.length;
        if (this.remaining === 0) this.finish();
        continue;
      }
      const headerLength = this.startup ? 8 : 5;
      const part = chunk.subarray(offset, offset + headerLength - this.header.length);
      this.header = Buffer.concat([this.header, part]);
      offset += part.length;
      if (this.header.length < headerLength) return;
      this.begin();
    }
  }

  private begin(): void {
    if (this.startup) {
      const code = this.header.readInt32BE(4);
      if (code !== SSL_REQUEST && code !== GSSENC_REQUEST) this.startup = false;
      this.type = 0;
      this.remaining = this.header.readInt32BE(0) - 8;
    } else {
      this.type = this.header[0]!;
      this.remaining = this.header.readInt32BE(1) - 4;
    }
    this.header = Buffer.alloc(0);
    this.body = this.type === QUERY || this.type === PARSE || this.type === BIND ? [] : undefined;
    if (this.remaining === 0) this.finish();
  }

  private finish(): void {
    const body = this.body ? Buffer.concat(this.body) : undefined;
    this.body = undefined;
    if (this.type === QUERY) this.onTrip({ sql: cString(body!, 0) });
    else if (this.type === PARSE) {
      const name = cString(body!, 0);
      this.pendingSql = cString(body!, body!.indexOf(0) + 1);
      if (name) this.prepared.set(name, this.pendingSql);
    } else if (this.type === BIND && !this.pendingSql) {
      const name = cString(body!, body!.indexOf(0) + 1); // after the portal name
      this.pendingSql = `(prepared ${name}) ${this.prepared.get(name) ?? ''}`;
    } else if (this.type === SYNC) {
      this.onTrip({ sql: this.pendingSql || '(a prepared statement)' });
      this.pendingSql = '';
    }
  }
}

function cString(buffer: Buffer, start: number): string {
  const end = buffer.indexOf(0, start);
  return buffer.toString('utf8', start, end === -1 ? buffer.length : end).replace(/\s+/g, ' ').trim();
}
