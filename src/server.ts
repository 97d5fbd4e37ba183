import type { FastifyInstance } from 'fastify';
import { buildApp } from './app.js';
import { type Config, ConfigError, loadConfig, requireWritableDataDir } from './config.js';
import { DatabaseLockedError } from './db/database.js';

/** While shutting down, how often connections that have become idle are closed. */
const IDLE_CONNECTION_REAP_MS = 100;
/** Past the shutdown bound, how long the rest of closing (the database's connections) may take before the process exits anyway. */
const CLOSE_GRACE_MS = 5_000;

async function main(): Promise<void> {
  let config: Config;
  let app: FastifyInstance;
  try {
    config = loadConfig();
    requireWritableDataDir(config.DATA_DIR);
    app = await buildApp(config);
  } catch (error) {
    if (error instanceof ConfigError || error instanceof DatabaseLockedError) {
      // One clear line naming what is wrong, no stack trace.
      process.stderr.write(`${error.message}\n`);
      process.exit(1);
    }
    throw error;
  }

  let stopping = false;
  const stop = async (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    app.log.info({ signal }, 'shutting down: no new connections, finishing requests in flight');
    // Requests still running after the bound are cut so that the process always exits.
    const force = setTimeout(() => {
      app.log.warn('shutdown bound reached: closing remaining connections');
      app.server.closeAllConnections();
      // A database that stopped answering holds its connections, and the pool's end, for ever.
      setTimeout(() => {
        app.log.error('shutdown could not finish closing in time: exiting anyway');
        process.exit(1);
      }, CLOSE_GRACE_MS).unref();
    }, config.SHUTDOWN_TIMEOUT_MS);
    force.unref();
    // Node closes idle keep-alive connections once, when the server stops listening. One whose response
    // ends later would idle until its keep-alive timeout and hold every shutdown to the bound.
    setInterval(() => app.server.closeIdleConnections(), IDLE_CONNECTION_REAP_MS).unref();
    try {
      await app.close(); // stops listening, waits for in-flight requests, runs onClose (closes the database)
      process.exit(0);
    } catch (error) {
      app.log.error({ err: error }, 'shutdown failed');
      process.exit(1);
    }
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);

  try {
    await app.listen({ port: config.PORT, host: config.HOST });
  } catch (error) {
    // The port taken, an address this machine does not have, a host name that does not resolve: the
    // environment is wrong, and says so in one line as a bad variable does. Anything else is a bug.
    if (!(error instanceof Error && 'syscall' in error)) throw error;
    process.stderr.write(`Cannot listen on ${config.HOST} port ${config.PORT}: ${error.message}\n`);
    // The database is open: closed (the embedded one's lock file removed) unless that hangs.
    setTimeout(() => process.exit(1), CLOSE_GRACE_MS).unref();
    await app.close().catch(() => undefined); // already failing: the line above is the one to show
    process.exit(1);
  }
}

await main();
