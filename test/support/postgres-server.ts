import { execFile } from 'node:child_process';
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { findPostgresTool } from '../../src/db/backup-postgres.js';
import { freePort } from './server-process.js';

const run = promisify(execFile);

/** PostgreSQL refuses to run as root; as root its programs run as the `postgres` OS user instead. */
const asRoot = process.getuid?.() === 0;
const asPostgres = (program: string, args: string[]) =>
  asRoot ? run('runuser', ['-u', 'postgres', '--', program, ...args]) : run(program, args);

/**
 * A PostgreSQL server of the test's own (initdb into a temporary folder, its own port and socket), for
 * tests that stop and start the database under load. `destroy` stops it and removes every file.
 */
export class PostgresServer {
  private constructor(
    private readonly bin: string,
    private readonly folder: string,
    private readonly port: number,
  ) {}

  /** The `postgres` database of the server, as user `postgres` (trusted on loopback). */
  get url(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  private get dataDir(): string {
    return join(this.folder, 'data');
  }

  /** Creates and starts a new server. */
  static async start(): Promise<PostgresServer> {
    const initdb = findPostgresTool('initdb');
    if (!initdb) {
      throw new Error('initdb not found on PATH nor under /usr/lib/postgresql/*/bin: install the PostgreSQL server (Debian: postgresql)');
    }
    // Made by the user that runs the server, so that it owns the folder.
    const { stdout } = await asPostgres('mktemp', ['-d', join(tmpdir(), 'chatbot-pg-XXXXXX')]);
    const server = new PostgresServer(dirname(initdb), stdout.trim(), await freePort());
    try {
      await asPostgres(initdb, ['-D', server.dataDir, '-U', 'postgres', '--auth=trust', '--no-locale', '-E', 'UTF8', '--no-sync']);
      await server.resume();
    } catch (error) {
      server.remove();
      throw error;
    }
    return server;
  }

  /** Starts the stopped server again, on the same port and data; resolves once it accepts connections. */
  async resume(): Promise<void> {
    const options = `-p ${this.port} -k ${this.folder} -c listen_addresses=127.0.0.1`;
    await this.pgCtl(['start', '-w', '-t', '60', '-l', join(this.folder, 'server.log'), '-o', options]);
  }

  /**
   * Stops the server: `fast` ends every session and shuts down cleanly; `immediate` kills it as a crash
   * would, and the next start recovers from the write-ahead log.
   */
  async stop(mode: 'fast' | 'immediate'): Promise<void> {
    await this.pgCtl(['stop', '-w', '-t', '60', '-m', mode]);
  }

  /** Stops the server if it runs and removes its folder; never throws (for an afterAll). */
  async destroy(): Promise<void> {
    await this.stop('immediate').catch(() => {});
    this.remove();
  }

  private remove(): void {
    rmSync(this.folder, { recursive: true, force: true });
  }

  private async pgCtl(args: string[]): Promise<void> {
    await asPostgres(join(this.bin, 'pg_ctl'), ['-D', this.dataDir, ...args]);
  }
}
