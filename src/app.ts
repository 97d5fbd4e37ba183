import type { IncomingMessage, ServerResponse } from 'node:http';
import { join } from 'node:path';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { validatorCompiler } from 'fastify-type-provider-zod';
import type { Config } from './config.js';
import { settleRestore } from './db/backup-store.js';
import { type Database, openDatabase } from './db/database.js';
import { createTokens, registerAuthentication } from './http/auth.js';
import { answerClientError, answerFrameworkError, MissingHost, registerErrorHandling, ShuttingDown } from './http/errors.js';
import { corsOutsideHooks, jsonBodyRefusal, registerHardening } from './http/hardening.js';
import { censorChildBindings, requestLogger, RequestLines, serializeError, serializeRequest, withoutSecrets } from './http/logging.js';
import { standardOutput } from './http/standard-output.js';
import { registerMetrics } from './http/metrics.js';
import { registerOpenApi } from './http/openapi.js';
import { registerRateLimits } from './http/rate-limit.js';
import { requestIdOf } from './http/request-id.js';
import { setResponseHeaders } from './http/security-headers.js';
import { serializerCompiler } from './http/serialization.js';
import { authRoutes } from './modules/auth/routes.js';
import { HistoryCache } from './modules/chat/history-cache.js';
import { IdempotencyStore } from './modules/chat/idempotency.js';
import { chatRoutes } from './modules/chat/routes.js';
import type { ChatResult } from './modules/chat/schemas.js';
import { ChatService, requireRoomForAMessage } from './modules/chat/service.js';
import { PasswordHasher } from './modules/auth/password-hasher.js';
import { AuthService } from './modules/auth/service.js';
import { fileRoutes } from './modules/files/routes.js';
import { ProviderCopies } from './modules/files/provider-copies.js';
import { FilesService } from './modules/files/service.js';
import { LocalDiskStorage } from './modules/files/storage.js';
import { healthRoutes } from './modules/health/routes.js';
import { messageRoutes } from './modules/messages/routes.js';
import { MessagesService } from './modules/messages/service.js';
import { projectRoutes } from './modules/projects/routes.js';
import { ProjectsService } from './modules/projects/service.js';
import { promptRoutes } from './modules/prompts/routes.js';
import { PromptsService } from './modules/prompts/service.js';
import { meterProviders } from './providers/metered.js';
import { catalogName } from './providers/models.js';
import { createProviders, defaultModelOf } from './providers/registry.js';
import { type CallLog, PROVIDER_SETTINGS, type ProviderRetry } from './providers/types.js';
import { SMALL_BODY_LIMIT_BYTES } from './http/body-limits.js';
import './validation-messages.js';

export interface AppDependencies {
  /** An open, migrated database. Without one, buildApp opens the configured one and closes it with the app. */
  database?: Database;
  /** Where log lines go (standard output by default); tests read them from here. */
  logStream?: NodeJS.WritableStream;
  /** Aborted when the process is asked to stop while the app is built: the migrations stop waiting for another instance's. */
  stopping?: AbortSignal;
}

export async function buildApp(config: Config, deps: AppDependencies = {}): Promise<FastifyInstance> {
  requireRoomForAMessage(config, defaultModelOf(config));
  const cors = corsOutsideHooks(config);
  const app = Fastify({
    logger: {
      level: config.LOG_LEVEL,
      // Secrets are left out of every line (src/http/logging.ts); pino's own `redact` cost a quarter of a request.
      formatters: { log: withoutSecrets },
      serializers: { err: serializeError, req: serializeRequest },
      stream: deps.logStream ?? standardOutput(),
    },
    logController: new RequestLines(),
    // Each request's logger binds its id (reqId), made when the request first logs (src/http/logging.ts).
    childLoggerFactory: requestLogger,
    // A path with a slash at its end is the path without it, on every route, as Express has it by
    // default: Fastify alone answered one for a prefix's root only (`/api/v1/projects/`, not `…/:id/`).
    routerOptions: { ignoreTrailingSlash: true },
    genReqId: requestIdOf,
    bodyLimit: SMALL_BODY_LIMIT_BYTES,
    // A request that trickles in would hold its connection (an upload, its temporary file) for as long as
    // its client liked: Fastify turns Node's own bound off unless it is given one. Node applies it only
    // while the bound on headers is no longer (60 s by default), and checks both on an interval (30 s by
    // default), which a quarter of a shorter bound keeps near what was configured.
    requestTimeout: config.REQUEST_TIMEOUT_MS,
    http: {
      headersTimeout: Math.min(60_000, config.REQUEST_TIMEOUT_MS),
      connectionsCheckingInterval: Math.min(30_000, Math.ceil(config.REQUEST_TIMEOUT_MS / 4)),
      // Node's own 400 for an HTTP/1.1 request without Host (a health check written by hand) has no
      // body and no request id: the first hook refuses it instead.
      requireHostHeader: false,
    },
    // Behind a load balancer, the client's address (rate limits, logs) comes from X-Forwarded-For.
    trustProxy: config.TRUST_PROXY,
    // Fastify's own 503 for a request that arrives while the app closes is not problem+json: see below.
    return503OnClosing: false,
    // The router's own errors (a malformed or over-long path parameter) are problem+json too.
    frameworkErrors: (error, request, reply) => {
      cors?.(request, reply);
      request.server.metrics.countRefused(request, reply);
      answerFrameworkError(error, request, reply);
    },
    // So are requests Node's parser refuses before routing (headers over the limit, malformed HTTP).
    clientErrorHandler: answerClientError,
  });
  censorChildBindings(app.log);
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);
  // The API speaks JSON (and multipart for uploads); any other body is 415, not a string handed to a route.
  app.removeContentTypeParser('text/plain');
  // An empty body is no body, whatever Content-Type says: clients that set `application/json` on every
  // request (a fetch wrapper, a requests Session) send it on a DELETE too, which Fastify's own parser
  // refused (400). A route that needs a body refuses its absence itself (400 on `body`).
  const parseJson = app.getDefaultJsonParser(app.initialConfig.onProtoPoisoning ?? 'error', app.initialConfig.onConstructorPoisoning ?? 'error');
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body: Buffer, done) => {
    if (body.length === 0) done(null, undefined);
    else {
      const refusal = jsonBodyRefusal(request.headers['content-type'], body);
      if (refusal) done(refusal, undefined);
      else parseJson(request, body.toString(), done);
    }
  });

  const database = deps.database ?? (await openMigratedDatabase(config, app.log, deps.stopping));
  if (!deps.database) app.addHook('onClose', () => database.close());

  // Every response carries its request id and security headers, set first so that an answer given by any
  // later hook carries them too; a request that still arrives on an open connection while the app closes
  // is refused before any work (Fastify closes its connection after the answer). One callback hook for
  // both, not async ones: it runs on every request.
  let closing = false;
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onRequest', (request, reply, done) => {
    setResponseHeaders(request, reply);
    if (closing) {
      cors?.(request, reply);
      done(new ShuttingDown());
    } else if (request.headers.host === undefined && request.raw.httpVersionMinor === 1) done(new MissingHost());
    else {
      // Stopping, the server still listening (SHUTDOWN_DELAY_MS): every connection closes after its
      // answer, so that a load balancer's kept-alive ones are gone before the server stops listening,
      // not closed under a request it is sending.
      if (deps.stopping?.aborted) reply.header('connection', 'close');
      done();
    }
  });
  // An Expect other than 100-continue: Node's own 417 has no body and no request id. RFC 9110 (10.1.1)
  // lets a server ignore an expectation it does not know; the request is served as if it had none.
  app.server.on('checkExpectation', (request: IncomingMessage, response: ServerResponse) => app.server.emit('request', request, response));
  registerErrorHandling(app);
  await registerHardening(app, config);
  await registerOpenApi(app);
  const metrics = registerMetrics(app, database, (model) => (model === config.AI_MODEL ? model : catalogName(model)), config.METRICS_TOKEN);
  // Not refused: a private network may be all that reaches it. But a public one reads every route's
  // traffic there, failed logins among it, and nothing said so.
  if (config.NODE_ENV === 'production' && config.METRICS_TOKEN === undefined) {
    app.log.warn('GET /metrics takes no token (METRICS_TOKEN is unset): anyone who reaches it reads the traffic of every route');
  }
  const rateLimits = await registerRateLimits(app, config);

  const tokens = createTokens(config.JWT_SECRET, config.JWT_EXPIRES_IN);
  registerAuthentication(app, database.db, tokens, rateLimits);

  await app.register(healthRoutes, { database, stopping: deps.stopping });
  // A retry is otherwise seen nowhere: a call that succeeds at its second try is one `ok`.
  const onRetry = (retry: ProviderRetry, log: CallLog = app.log) => {
    log.warn(retry, 'AI provider call failed; trying it again');
    metrics.countProviderRetry(retry);
  };
  const providers = meterProviders(createProviders(config, onRetry), metrics.recordProviderCall);
  if (providers.defaultModel === undefined) {
    app.log.warn(`No AI provider is configured (AI_PROVIDER=${config.AI_PROVIDER}): chats with it (in every project that names no other) are 503 PROVIDER_NOT_CONFIGURED until ${PROVIDER_SETTINGS[config.AI_PROVIDER]} is set`);
  }
  // After the chat routes' own close, which waits for the turns in flight.
  app.addHook('onClose', () => providers.close());
  const uploads = join(config.DATA_DIR, 'files');
  // A restore swaps the uploads in after the database: one cut short after the database's point of no
  // return (the database is open: its own folder is settled) had restored it, so the files it had copied
  // go in.
  await settleRestore(config.DATA_DIR, [[uploads, 'forward']]);
  const storage = new LocalDiskStorage(uploads);
  sweepInBackground(app, {
    what: 'the temporary files of interrupted uploads',
    sweep: () => storage.sweepStaging(INTERRUPTED_UPLOAD_MS),
    everyMs: FILE_SWEEP_EVERY_MS,
  });
  const providerCopies = new ProviderCopies(database.db, providers, config);
  sweepInBackground(app, {
    what: 'the provider copies of deleted files',
    sweep: (closing) => providerCopies.deleteDue(closing, app.log),
    everyMs: PROVIDER_COPIES_SWEEP_MS,
  });
  const files = new FilesService(database.db, storage, providers, providerCopies, config);
  sweepInBackground(app, {
    what: 'the file bytes no file row names',
    sweep: (closing) => files.removeStrayBytes(storage.keysWrittenBefore(STRAY_BYTES_MS, STRAY_BYTES_BATCH), STRAY_BYTES_MS, () => closing.aborted),
    everyMs: FILE_SWEEP_EVERY_MS,
  });
  // The histories chat turns read past their first page, kept in the process; what deletes messages forgets them.
  const historyCache = new HistoryCache(config.HISTORY_CACHE_MB * 1024 * 1024);
  await app.register(authRoutes, { prefix: '/api/v1/auth', auth: new AuthService(database, tokens, new PasswordHasher(config), files, historyCache) });
  await app.register(projectRoutes, { prefix: '/api/v1/projects', projects: new ProjectsService(database, files, config, historyCache) });
  await app.register(promptRoutes, { prefix: '/api/v1/projects/:projectId/prompts', prompts: new PromptsService(database.db, config) });
  await app.register(messageRoutes, { prefix: '/api/v1/projects/:projectId/messages', messages: new MessagesService(database, historyCache) });
  await app.register(fileRoutes, { prefix: '/api/v1/projects/:projectId/files', files, maxBytes: config.FILE_MAX_BYTES });
  // A key whose request has said nothing for the longest a chat may go without (its deadline, twice)
  // belongs to an instance that died.
  const idempotency = new IdempotencyStore<ChatResult>(database.db, 2 * config.AI_TIMEOUT_MS);
  sweepInBackground(app, {
    what: 'the idempotency keys past their replay window',
    sweep: (closing) => idempotency.sweep(undefined, () => closing.aborted),
    everyMs: IDEMPOTENCY_SWEEP_MS,
  });
  await app.register(chatRoutes, {
    prefix: '/api/v1/projects/:projectId',
    chat: new ChatService(database, providers, files, config, historyCache),
    idempotency,
    shutdownTimeoutMs: config.SHUTDOWN_TIMEOUT_MS,
    // As long as the upstream may stay silent: a client may be as slow as the provider, no slower.
    writeStallMs: config.AI_TIMEOUT_MS,
    chatsPerUser: config.CHAT_CONCURRENCY_PER_USER,
  });

  return app;
}

async function openMigratedDatabase(config: Config, log: FastifyBaseLogger, stopping?: AbortSignal): Promise<Database> {
  const database = await openDatabase(config);
  try {
    await database.migrate((waiting) => log.warn(waiting), stopping);
  } catch (error) {
    await database.close();
    throw error;
  }
  return database;
}

/** An upload older than this is no longer being written: its temporary is a crash's leftover. */
const INTERRUPTED_UPLOAD_MS = 24 * 60 * 60 * 1000;

/**
 * Named bytes older than this are no upload whose row is still to come: an upload's bytes are written
 * within REQUEST_TIMEOUT_MS, then copied to the provider within AI_TIMEOUT_MS (an hour at most each),
 * then named, and its row written right after. With no row, they are stray.
 */
const STRAY_BYTES_MS = 24 * 60 * 60 * 1000;
/** Keys one look-up of their rows takes at most. */
const STRAY_BYTES_BATCH = 1000;

/**
 * How often, after the start, the uploads' leftovers are looked for again: the bytes of a deleted file
 * that could not be removed then are someone's data, gone within two days, not at a next start that a
 * server up for months never has.
 */
const FILE_SWEEP_EVERY_MS = 24 * 60 * 60 * 1000;

/** How often the provider copies of deleted files whose deletion failed are tried again, once their wait is over. */
const PROVIDER_COPIES_SWEEP_MS = 60 * 1000;

/** How often idempotency keys past their replay window are deleted: each keeps a whole turn, question and answer. */
const IDEMPOTENCY_SWEEP_MS = 60 * 60 * 1000;

/**
 * Removes what is no longer wanted at the start and then, with `everyMs`, that often. The start does
 * not wait for it (the first sweep in a long while may have a lot to go through); closing does, after
 * telling it to stop (`sweep` checks its signal between batches, and cuts its calls to a provider short
 * with it), and before the database closes (an
 * onClose hook added later runs earlier). A failed sweep is logged and tried again at the next time.
 */
function sweepInBackground(app: FastifyInstance, { what, sweep, everyMs }: { what: string; sweep: (closing: AbortSignal) => Promise<number>; everyMs?: number }): void {
  const closing = new AbortController();
  let sweeping: Promise<void> | undefined;
  const run = () => {
    sweeping ??= sweep(closing.signal)
      .then(
        (removed) => app.log[removed ? 'info' : 'debug']({ removed }, `removed ${what}`),
        (error: unknown) => app.log.warn({ err: error }, `could not remove ${what}`),
      )
      .finally(() => (sweeping = undefined));
  };
  run();
  const timer = everyMs === undefined ? undefined : setInterval(run, everyMs).unref();
  app.addHook('onClose', async () => {
    closing.abort();
    clearInterval(timer);
    await sweeping;
  });
}
