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

/** How far down an error's causes a failed query is looked for. */
const MAX_CAUSES = 8;

/**
 * pino's error serializer, less the values of a failed query: drizzle writes every bound value into its
 * error's message (so into each message and stack it causes) and keeps them in `params`, and those are a
 * password hash, an email, a chat's text. The statement itself is kept, and what the database said.
 */
export function serializeError(error: Error): ReturnType<typeof stdSerializers.err> {
  const serialized = stdSerializers.err(error);
  let cause: unknown = error;
  for (let depth = 0; cause instanceof Error && depth < MAX_CAUSES; cause = cause.cause, depth++) {
    if (!(cause instanceof DrizzleQueryError)) continue;
    // Exactly what drizzle wrote, wherever it went.
    const values = `\nparams: ${String(cause.params)}`;
    serialized.message = serialized.message.replaceAll(values, '\nparams: [redacted]');
    serialized.stack = serialized.stack.replaceAll(values, '\nparams: [redacted]');
  }
  if (error instanceof DrizzleQueryError) delete (serialized as { params?: unknown }).params;
  return serialized;
}
