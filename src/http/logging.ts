import { DrizzleQueryError } from 'drizzle-orm';
import { type FastifyBaseLogger, type FastifyReply, type FastifyRequest, type FastifyServerOptions, LogController } from 'fastify';
import { type DestinationStream, stdSerializers, symbols } from 'pino';
import type { AuthUser } from './auth.js';
import { queryStart } from './query-start.js';
import { streamFailure } from './stream-failures.js';

type Bindings = Parameters<FastifyBaseLogger['child']>[0];
type ChildOptions = Parameters<FastifyBaseLogger['child']>[1];
const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;
type Level = (typeof LEVELS)[number];
type LogMethod = (...line: unknown[]) => void;
/** Fastify's logger is pino, which can tell whether a level is enabled. */
type Logger = FastifyBaseLogger & { isLevelEnabled(level: string): boolean };

/**
 * A request's logger (`request.log`, `reply.log`): the app's logger with the request's id bound
 * (`reqId`), so that every line the request logs carries it. pino's child is made on the request's first
 * line at an enabled level, not for every request: making one censors and serializes its bindings,
 * about a microsecond, and most requests log nothing but the line of their answer (`completed`).
 */
class RequestLogger implements FastifyBaseLogger {
  private bound: FastifyBaseLogger | undefined;

  constructor(
    private readonly parent: Logger,
    private readonly bindings: Bindings,
  ) {}

  private get logger(): FastifyBaseLogger {
    return (this.bound ??= this.parent.child(this.bindings));
  }

  get level(): FastifyBaseLogger['level'] {
    return this.bound?.level ?? this.parent.level;
  }

  set level(level: FastifyBaseLogger['level']) {
    this.logger.level = level;
  }

  child(bindings: Bindings, options?: ChildOptions): FastifyBaseLogger {
    return this.logger.child(bindings, options);
  }

  declare fatal: LogMethod;
  declare error: LogMethod;
  declare warn: LogMethod;
  declare info: LogMethod;
  declare debug: LogMethod;
  declare trace: LogMethod;

  static {
    for (const level of LEVELS) {
      this.prototype[level] = function (this: RequestLogger, ...line: unknown[]) {
        this.write(level, line);
      };
    }
  }

  silent(): void {}

  private write(level: Level, line: unknown[]): void {
    // The child's own level once there is one (it may have been set on it); the app's until then.
    const enabled = this.bound ? (this.bound as Logger).isLevelEnabled(level) : this.parent.isLevelEnabled(level);
    if (enabled) (this.logger[level] as LogMethod)(...line);
  }

  /**
   * The line of a request answered, at `info`: what pino writes of `{ req, res, responseTime }` with
   * Fastify's serializers, written here as text. pino's generic path (the request's child, the
   * serializers' objects, a stringify of each) cost about 12 µs of CPU a request more on a loaded
   * server (benchmark figure 1's route). A request that logged before has its child, which writes the
   * line itself; `test/http/logging.test.ts` holds the two to the same fields in the same order.
   */
  completed(request: FastifyRequest, reply: FastifyReply): void {
    if (this.bound) {
      this.bound.info(answered(request, reply), COMPLETED);
      return;
    }
    if (!this.parent.isLevelEnabled('info')) return;
    // pino's own: where it writes, and the fields its every line carries (`pid`, `hostname`).
    const pino = this.parent as unknown as Record<symbol, unknown>;
    let bindings = '';
    for (const [key, value] of Object.entries(withoutSecrets(this.bindings))) bindings += jsonField(`,${JSON.stringify(key)}:`, value);
    // A method is one of the tokens Node's parser knows: nothing in it to escape.
    const req =
      `"method":"${request.method}","url":${JSON.stringify(loggedUrl(request.url))}` +
      jsonField(',"version":', request.headers['accept-version']) +
      jsonField(',"host":', request.host) +
      jsonField(',"remoteAddress":', request.ip) +
      jsonField(',"remotePort":', request.socket?.remotePort);
    (pino[symbols.streamSym] as DestinationStream).write(
      `{"level":30,"time":${Date.now()}${pino[symbols.chindingsSym] as string}${bindings},"req":{${req}}${jsonField(',"userId":', userIdOf(request))},` +
        `"res":{"statusCode":${reply.statusCode}}${jsonField(',"streamError":', streamFailure(reply))},"responseTime":${reply.elapsedTime},"msg":"${COMPLETED}"}\n`,
    );
  }
}

const COMPLETED = 'request completed';
/**
 * What a request's last line says: what was asked and by which account, how it went (and for a stream
 * that ended with an `error` event, what that said), and in how long (ms).
 */
const answered = (request: FastifyRequest, reply: FastifyReply) => ({
  req: request,
  userId: userIdOf(request),
  res: reply,
  streamError: streamFailure(reply),
  responseTime: reply.elapsedTime,
});

/**
 * The account that a request's token names, once its signature is verified (`registerAuthentication`):
 * what a support ticket's "my chat failed at 14:02" is looked up by. None for a public route, or a
 * token refused at once.
 */
export const userIdOf = (request: FastifyRequest): string | undefined => (request.user as AuthUser | null)?.id;

/** A property as JSON writes it (`,"key":` given), nothing for a value it leaves out (undefined). */
const jsonField = (key: string, value: unknown): string => (value === undefined ? '' : key + JSON.stringify(value));

/**
 * The query parameters whose values a log line keeps, each with the shape of the values the routes take
 * (the lists' `limit` and `cursor`, src/http/pagination.ts: digits, and base64url). A value of another
 * shape (a token sent as a cursor, the rest of `?limit=5?access_token=…`) is redacted as any other is.
 */
export const LOGGED_QUERY_VALUES: Readonly<Record<string, RegExp>> = { limit: /^\d{1,3}$/, cursor: /^[\w-]{1,512}$/ };
/** A query parameter's name that a log line keeps beside a redacted value: a short name, not a token. */
const PARAMETER_NAME = /^[A-Za-z_][\w.-]{0,39}$/;

/**
 * A request's URL as its lines log it: the path, and of the query the values that LOGGED_QUERY_VALUES
 * keeps; any other value is REDACTED (the whole pair, where its name could itself be a secret). No
 * route reads a token or a password from the query, but a client may send one there all the same
 * (`?access_token=…`), and it was written to the log whole, for anyone who reads the log.
 */
export function loggedUrl(url: string): string {
  const start = queryStart(url);
  if (start === -1) return url;
  const pairs = url.slice(start + 1).split('&').map((pair) => {
    const equals = pair.indexOf('=');
    if (equals === -1) return pair === '' || Object.hasOwn(LOGGED_QUERY_VALUES, pair) ? pair : REDACTED;
    const name = pair.slice(0, equals);
    if (Object.hasOwn(LOGGED_QUERY_VALUES, name) && LOGGED_QUERY_VALUES[name]!.test(pair.slice(equals + 1))) return pair;
    return PARAMETER_NAME.test(name) ? `${name}=${REDACTED}` : REDACTED;
  });
  return `${url.slice(0, start + 1)}${pairs.join('&')}`;
}

/** Fastify's serializer of a logged request (`req`), its URL as `loggedUrl` gives it. */
export function serializeRequest(request: FastifyRequest) {
  return {
    method: request.method,
    url: loggedUrl(request.url),
    version: request.headers?.['accept-version'] as string | undefined,
    host: request.host,
    remoteAddress: request.ip,
    remotePort: request.socket?.remotePort,
  };
}

/**
 * Fastify's `childLoggerFactory`. A route with a log level or serializers of its own gets pino's child at
 * once, as Fastify would make it; no route here has either.
 */
export const requestLogger: NonNullable<FastifyServerOptions['childLoggerFactory']> = (logger, bindings, options) =>
  options.level || options.serializers ? logger.child(bindings, options) : new RequestLogger(logger as Logger, bindings);

/**
 * Fastify's lines of each request: one at `info`, once it is answered, with what was asked (method, URL,
 * address) and how it went (status, time), as an access log has it; the line of its arrival only at
 * `debug`. Fastify's own wrote both at `info`: two lines a request, which took more of a simple request's
 * time than answering it. A request that ends otherwise says what was asked too: an error here, a client
 * gone first in the metrics' `request abandoned`.
 */
export class RequestLines extends LogController {
  override incomingRequest(request: FastifyRequest): void {
    request.log.debug({ req: request }, 'incoming request');
  }

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (error) reply.log.error({ ...answered(request, reply), err: error }, 'request errored');
    else if (reply.log instanceof RequestLogger) reply.log.completed(request, reply);
    else reply.log.info(answered(request, reply), COMPLETED);
  }
}

const REDACTED = '[redacted]';
/** The keys of a logged object whose values are never written: passwords, and a request's credentials in its headers. */
const SECRET_KEYS = ['password', 'currentPassword', 'newPassword'];
/**
 * The headers that may carry a credential: `authorization` and `cookie`, and those a client or a proxy
 * in front sends one in, whatever the service reads: `proxy-authorization`, `x-api-key`, a session's, an
 * identity-aware proxy's assertion (Cloudflare Access's `cf-access-jwt-assertion`, Google IAP's, AWS's
 * `x-amzn-oidc-data`), a gateway's subscription key. Not `idempotency-key`, a client's name for a request.
 */
const SECRET_HEADER = /auth|cookie|token|secret|password|session|jwt|assertion|credential|oidc|api[-_]?key|subscription-key|functions-key/i;

/** The keys whose values their serializers pick from (Fastify's `req` and `res`, `serializeError`): none holds a secret once serialized. */
const SERIALIZED = new Set(['req', 'res', 'err']);

type Fields = Record<string, unknown>;
/** An object that JSON writes as its own properties: not an array, nor one with a form of its own (`toJSON`: a date, a buffer). */
const isRecord = (value: unknown): value is Fields =>
  typeof value === 'object' && value !== null && !Array.isArray(value) && typeof (value as { toJSON?: unknown }).toJSON !== 'function';

/**
 * pino's `formatters.log`, and what every child logger is bound to (`censorChildBindings`): the fields of
 * a line, each object among them without its secrets: `{ body: { password } }`, `{ busboyOptions: {
 * headers } }` (the uploads' parser logs its options at `trace`, the request's headers among them), an
 * error or an instance of a class under any key. In place of pino's `redact` with paths of any first key
 * (`*.password`), which walked and copied every value of every line: a quarter of a simple request's
 * time at `info`. What a serializer picks from (SERIALIZED) is left to it: a request's headers are not
 * among what Fastify's picks, and `serializeError` leaves an error's secrets out itself.
 */
export function withoutSecrets<T extends Fields>(fields: T): T {
  let copy: Fields | undefined;
  for (const key in fields) {
    const value = fields[key];
    if (!isRecord(value) || SERIALIZED.has(key)) continue;
    const censored = withoutOwnSecrets(value);
    if (censored !== value) (copy ??= { ...fields })[key] = censored;
  }
  return (copy ?? fields) as T;
}

/**
 * Makes every logger that descends from `root` bind its fields without secrets: a request's, one that
 * Fastify makes for a route or a plugin with a log level of its own, a child's child. pino's formatters
 * never see a child's bindings (its `redact` did). pino makes a child as an object whose prototype is its
 * parent, so each inherits this `child` from the root.
 */
export function censorChildBindings(root: FastifyBaseLogger): void {
  const pinoChild = root.child;
  root.child = function (this: FastifyBaseLogger, bindings: Bindings, options?: ChildOptions) {
    return pinoChild.call(this, withoutSecrets(bindings), options);
  };
}

/** `object` with its SECRET_KEYS, and those of its `headers`, written as REDACTED: a copy where there are any (the object is its caller's). */
function withoutOwnSecrets(object: Fields): Fields {
  const copy = censored(object, SECRET_KEYS);
  const { headers } = object;
  if (!isRecord(headers)) return copy;
  const censoredHeaders = censored(headers, Object.keys(headers).filter((name) => SECRET_HEADER.test(name)));
  return censoredHeaders === headers ? copy : { ...copy, headers: censoredHeaders };
}

/** `object`, or a copy of what JSON writes of it (its own properties) with `keys` written as REDACTED. */
function censored(object: Fields, keys: string[]): Fields {
  let copy: Fields | undefined;
  for (const key of keys) if (key in object) (copy ??= { ...object })[key] = REDACTED;
  return copy ?? object;
}

/** How deep into the errors an error holds (causes, aggregated errors, properties) a failed query is looked for. */
const MAX_DEPTH = 8;
const REDACTED_VALUES = '\nparams: [redacted]';

type SerializedError = ReturnType<typeof stdSerializers.err>;
/** What pino's serializer makes of an error: an object of its own prototype. */
const SERIALIZED_ERROR: unknown = Object.getPrototypeOf(stdSerializers.err(new Error()));
const isSerializedError = (value: unknown): value is SerializedError =>
  typeof value === 'object' && value !== null && Object.getPrototypeOf(value) === SERIALIZED_ERROR;

/**
 * pino's error serializer, less the values of a failed query: drizzle writes every bound value into its
 * error's message (so into each message and stack it causes) and keeps them in `params`, and those are a
 * password hash, an email, a chat's text. The statement itself is kept, and what the database said.
 */
export function serializeError(error: Error): SerializedError {
  const serialized = stdSerializers.err(error);
  const values = queryValues(error, 0, []);
  if (values.length > 0) redact(serialized, values, 0);
  // The error's own properties are logged: a password or credentials among them are not.
  return withoutOwnSecrets(serialized) as SerializedError;
}

/** The text drizzle wrote of each failed query's values, in `error` and in every error it holds. */
function queryValues(error: unknown, depth: number, found: string[]): string[] {
  if (!(error instanceof Error) || depth > MAX_DEPTH) return found;
  if (error instanceof DrizzleQueryError) found.push(`\nparams: ${String(error.params)}`);
  const held = [error.cause, ...(error instanceof AggregateError ? (error.errors as unknown[]) : []), ...Object.values(error)];
  for (const value of held) queryValues(value, depth + 1, found);
  return found;
}

/** Takes `values` out of what pino made of an error, and of the errors it made inside it (fresh objects, all). */
function redact(serialized: SerializedError, values: string[], depth: number): void {
  const without = (text: string) => values.reduce((rest, value) => rest.replaceAll(value, REDACTED_VALUES), text);
  serialized.message = without(serialized.message);
  serialized.stack = without(serialized.stack);
  if (serialized.type === 'DrizzleQueryError') delete (serialized as { params?: unknown }).params;
  if (depth >= MAX_DEPTH) return;
  for (const value of Object.values(serialized)) {
    for (const item of Array.isArray(value) ? (value as unknown[]) : [value]) {
      if (isSerializedError(item)) redact(item, values, depth + 1);
    }
  }
}
