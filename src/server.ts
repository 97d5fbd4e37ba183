import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { constants as osConstants } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyInstance } from 'fastify';
import type { Config } from './config.js';
/** Past the shutdown bound, how long the rest of closing (the database's connections) may take before the process exits anyway. */
const CLOSE_GRACE_MS = 5_000;
/** How soon after a first signal another is taken for the same one passed on (npm's relay), not a second Ctrl-C. */
const RELAYED_SIGNAL_MS = 500;
/** How long a signal sent to itself is given to end the process before it exits (see `onSignal`). */
const SELF_SIGNAL_MS = 100;
/** How often a server run by `npm start` looks whether its parent is still there (see `main`). */
const PARENT_WATCH_MS = 500;

async function main(): Promise<void> {
  // Heard from the first moment: a signal's default is to end the process at once (and a process that is
  // pid 1, in a container, ignores SIGTERM without a handler, so `docker stop` waited for its timeout).
  // One that comes while the app is built stops it once built, before it listens, and at once while
  // the migrations wait for another session (an instance applying them in a rolling deploy, for up to
  // minutes); a second signal of either kind has its default effect, so that a second Ctrl-C ends a
  // shutdown that takes too long. But not one within RELAYED_SIGNAL_MS of the first: a Ctrl-C reaches
  // the server from the terminal and again from npm (and tsx), which pass it on to their child, and
  // that relay ended the process mid-shutdown, its database left open, one `npm start` in two.
  let stopRequested: NodeJS.Signals | undefined;
  const stopping = new AbortController();
  let stop = async (signal: NodeJS.Signals) => {
    stopRequested = signal;
    stopping.abort();
  };
  let firstSignalAt: number | undefined;
  /** Ends SHUTDOWN_DELAY_MS's wait, while it runs. */
  let endDelay: (() => void) | undefined;
  const onSignal = (signal: NodeJS.Signals) => {
    if (firstSignalAt === undefined) {
      firstSignalAt = Date.now();
      void stop(signal);
    } else if (Date.now() - firstSignalAt < RELAYED_SIGNAL_MS) {
      // The first one passed on.
    } else if (endDelay) {
      // A second stop during the delay is not one during the shutdown: it ends the wait, not the process.
      process.stderr.write(`${signal} during SHUTDOWN_DELAY_MS: shutting down now\n`);
      firstSignalAt = Date.now();
      endDelay();
    } else {
      process.stderr.write(`${signal} again: stopping at once, requests in flight cut\n`);
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
      process.kill(process.pid, signal);
      // As pid 1 (a container run without an init), a signal with no handler is ignored: end as it would have.
      setTimeout(() => process.exit(128 + osConstants.signals[signal]), SELF_SIGNAL_MS);
    }
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  // Under `npm start` a shell stands between npm and this process, and passes on no signal: a SIGTERM
  // sent to npm (a process manager stopping it, `kill`) ended npm and the shell, and the server served
  // on, unsupervised, its port and the embedded database held. Its parent's end is taken for that
  // SIGTERM. (Not `exec node …` in the script, which cmd.exe, npm's shell on Windows, does not know;
  // `start:prod` execs node, for the container.)
  const parent = process.ppid;
  if (process.env.npm_lifecycle_event === 'start' && parent !== 1) {
    const watch = setInterval(() => {
      if (process.ppid === parent) return;
      clearInterval(watch);
      if (firstSignalAt !== undefined) return;
      process.stderr.write('The npm that started this server has exited: stopping as on SIGTERM\n');
      onSignal('SIGTERM');
    }, PARENT_WATCH_MS);
    watch.unref();
  }
  // Loaded once the signals are heard: loading the app's modules takes a moment of its own.
  const [{ buildApp }, { loadConfig, requireWritableDataDir }, { StartupError }] = await Promise.all([
    import('./app.js'),
    import('./config.js'),
    import('./startup-error.js'),
  ]);

  let config: Config;
  let app: FastifyInstance;
  try {
    config = loadConfig();
    requireWritableDataDir(config.DATA_DIR);
    app = await buildApp(config, { stopping: stopping.signal });
  } catch (error) {
    if (error === stopping.signal.reason) {
      process.stderr.write(`Stopped (${stopRequested}) while the migrations waited for another session\n`);
      process.exit(0);
    }
    if (error instanceof StartupError) {
      process.stderr.write(`${error.message}\n`);
      process.exit(1);
    }
    throw error;
  }

  const closeWhenAnswered = connectionsClosingWhenAnswered(app.server);
  stop = async (signal: NodeJS.Signals) => {
    stopping.abort(); // readiness (GET /health) fails from here on
    // An orchestrator's stop, not a Ctrl-C: served on for a while, so that what balances load here
    // (which learns of the stop from the same orchestrator, a moment later) takes no new connection to a
    // closed port. A second signal ends the wait; a third, the process, as a second does during the shutdown.
    if (signal === 'SIGTERM' && config.SHUTDOWN_DELAY_MS > 0 && app.server.listening) {
      app.log.info({ signal, delayMs: config.SHUTDOWN_DELAY_MS }, 'stopping after SHUTDOWN_DELAY_MS: serving meanwhile, GET /health answering 503');
      const wait = new AbortController();
      endDelay = () => wait.abort();
      await sleep(config.SHUTDOWN_DELAY_MS, undefined, { signal: wait.signal }).catch(() => {});
      endDelay = undefined;
    }
    app.log.info({ signal }, 'shutting down: no new connections, finishing requests in flight');
    closeWhenAnswered();
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
    try {
      await app.close(); // stops listening, waits for in-flight requests, runs onClose (closes the database)
      process.exit(0);
    } catch (error) {
      app.log.error({ err: error }, 'shutdown failed');
      process.exit(1);
    }
  };
  if (stopRequested) return stop(stopRequested);

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

/**
 * Makes the server close its connections at shutdown only once each has nothing left to send, and returns
 * what starts that: a connection with no response in flight is closed at once, one with a response once
 * that response has been handed to the kernel whole ('finish'). Node's own `closeIdleConnections()`, which
 * `server.close()` runs, counts a connection idle as soon as its response has *ended*, its bytes still in
 * Node's buffers, and destroys it with them: a slow client lost the end of its answer (a large page, a
 * stream's last event) to the shutdown. And one whose response ends after the server stops listening
 * would idle until its keep-alive timeout and hold the shutdown to its bound.
 */
function connectionsClosingWhenAnswered(server: Server): () => void {
  const answering = new Map<Socket, ServerResponse | undefined>();
  let closing = false;
  server.on('connection', (socket: Socket) => {
    answering.set(socket, undefined);
    socket.once('close', () => answering.delete(socket));
  });
  server.on('request', (request: IncomingMessage, response: ServerResponse) => {
    const { socket } = request;
    answering.set(socket, response);
    // 'close' comes after 'finish', once the last byte is handed to the kernel (or the client is gone).
    response.once('close', () => {
      if (answering.get(socket) !== response) return; // a later response's on the same connection (pipelined)
      answering.set(socket, undefined);
      if (closing) socket.destroySoon();
    });
  });
  server.closeIdleConnections = () => {
    for (const [socket, response] of answering) if (!response) socket.destroy();
  };
  return () => {
    closing = true;
    server.closeIdleConnections();
  };
}

await main();
