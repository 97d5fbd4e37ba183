import { DrizzleQueryError } from 'drizzle-orm';
import type { FastifyBaseLogger, FastifyServerOptions } from 'fastify';
import { stdSerializers } from 'pino';

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
 * line at an enabled level, not for every request: making one serializes its bindings through the
 * redaction paths (`*.password` applies to every key), about a microsecond, and most requests log
 * nothing at `warn`. At `info` Fastify logs every request's start and end, and the child is made then.
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
}

/**
 * Fastify's `childLoggerFactory`. A route with a log level or serializers of its own gets pino's child at
 * once, as Fastify would make it; no route here has either.
 */
export const requestLogger: NonNullable<FastifyServerOptions['childLoggerFactory']> = (logger, bindings, options) =>
  options.level || options.serializers ? logger.child(bindings, options) : new RequestLogger(logger as Logger, bindings);

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
  return serialized;
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
