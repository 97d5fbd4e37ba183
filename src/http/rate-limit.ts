import { isIPv6 } from 'node:net';
import fastifyRateLimit, { type RateLimitOptions } from '@fastify/rate-limit';
import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Redis } from 'ioredis';
import type { Config } from '../config.js';
import { RateLimited, toProblem } from './errors.js';

/**
 * The limits of the contract; each counts requests in a fixed window. `password` is the account
 * routes that check the caller's password (changing it, deleting the account): they count against
 * `api` as well.
 */
export type RateLimitGroup = 'login' | 'register' | 'chat' | 'api' | 'password';

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * The limit a route counts against when it is not the default: authenticated routes count against
     * `api`, public ones against none. A `password` route counts against `api` too.
     */
    rateLimitGroup?: Exclude<RateLimitGroup, 'api'>;
  }
}

/** What authentication reports to the limits, once it knows who is calling or that it cannot tell. */
export interface RateLimits {
  /** Counts a request of the authenticated `request.user` (chat or api); throws RateLimited over the limit. */
  countUser(request: FastifyRequest): Promise<void>;
  /** Counts a request that failed authentication against its address; throws RateLimited over the limit. */
  countAnonymous(request: FastifyRequest): Promise<void>;
}

/** The limit a route counts against, or none (a public route). */
export function rateLimitGroupOf(config: { public?: boolean; rateLimitGroup?: RateLimitGroup } | undefined): RateLimitGroup | undefined {
  return config?.rateLimitGroup ?? (config?.public ? undefined : 'api');
}

const MINUTE = 60_000;
/**
 * Failed logins an address may make in a window, all emails together: `RATE_LIMIT_LOGIN` for this many
 * accounts. Without it, one address could flood the counters with made-up emails until the one it
 * guesses at was dropped (in memory, least recently used first) and counted from zero again. Only
 * failures count, so that the users behind one address (a NAT, a proxy) may all sign in.
 */
const LOGIN_ACCOUNTS_PER_ADDRESS = 10;
/** Counters each limit keeps in memory (without Redis) before dropping the least recently used. */
const COUNTERS_IN_MEMORY = 20_000;
/** The longest email the login schema accepts: a longer one must not make a longer key. */
const MAX_EMAIL_LENGTH = 254;
/** The longest IPv6 address, with a zone and a port, is 60 characters or so: no address is longer. */
const MAX_OTHER_ADDRESS = 64;
/** How long the limits go unchecked, Redis not asked, after it failed to count (see `RedisHealth`). */
const REDIS_RETRY_MS = 5_000;

type Counter = ReturnType<FastifyInstance['createRateLimit']>;
/** What a count that could not be made answers: allowed (fail open). */
const UNCOUNTED = { isAllowed: true, key: '' } as const;

/**
 * The contract's rate limits on @fastify/rate-limit: login per address and email, register per
 * address, chat and every other authenticated route per user, and callers that fail authentication
 * per address (an IPv6 one by its /64: `addressKey`). Counters live in memory, or in Redis when REDIS_URL
 * is set so that every instance shares them. Every attempt counts, whatever its answer.
 */
export async function registerRateLimits(app: FastifyInstance, config: Config): Promise<RateLimits> {
  const health = config.REDIS_URL ? new RedisHealth(app.log) : undefined;
  const redis = config.REDIS_URL ? await connectRedis(config.REDIS_URL, health!) : undefined;
  if (redis) app.addHook('onClose', () => redis.disconnect());
  await app.register(fastifyRateLimit, {
    global: false,
    redis,
    nameSpace: `${config.REDIS_KEY_PREFIX}rate-limit:`,
    // A failure to count is met by `counter` (fail open, and said), not skipped unseen by the plugin.
    skipOnError: false,
  });

  const counter = (group: RateLimitGroup | 'failed-logins' | 'anonymous', max: number, timeWindow: number, key: (request: FastifyRequest) => string): Counter => {
    // `cache` is a route limit's option (RateLimitOptions) that createRateLimit passes on as well; the
    // plugin's own reaches only its root store, not the one each limit makes.
    const options: RateLimitOptions = { max, timeWindow, cache: COUNTERS_IN_MEMORY, keyGenerator: (request) => `${group}:${key(request)}` };
    const count = app.createRateLimit(options);
    if (!health) return count;
    // Fail open: while Redis fails, requests are served unlimited rather than the whole API failing with it.
    return async (request, callOptions) => {
      if (health.resting) return UNCOUNTED;
      try {
        const result = await count(request, callOptions);
        health.answered();
        return result;
      } catch (error) {
        health.failed(error as Error);
        return UNCOUNTED;
      }
    };
  };
  /** Counts a request; throws RateLimited once it is over the limit. */
  const limiter = (...args: Parameters<typeof counter>) => {
    const check = counter(...args);
    return async (request: FastifyRequest): Promise<void> => {
      const result = await check(request);
      if (!result.isAllowed && result.isExceeded) throw new RateLimited(result.ttlInSeconds);
    };
  };
  const failedLogins = counter('failed-logins', LOGIN_ACCOUNTS_PER_ADDRESS * config.RATE_LIMIT_LOGIN, 15 * MINUTE, (request) => addressKey(request.ip));
  const loginToAccount = limiter('login', config.RATE_LIMIT_LOGIN, 15 * MINUTE, (request) => `${addressKey(request.ip)}:${emailOf(request.body)}`);
  // Logins of an address being checked now, in this process: each may yet fail and be counted. Each
  // login's address, while it holds its room there (`holding`).
  const loginsInFlight = new Map<string, number>();
  const holding = new WeakMap<FastifyRequest, string>();
  const login = async (request: FastifyRequest) => {
    // Checked before, counted once the answer is known to be a failure (below). Those still being checked
    // take their room meanwhile: a burst sent at once all passed the check before any was counted, 60
    // failures where the cap was 10. Taken before anything is awaited, and given back once the answer is
    // settled (`settled`), a failure counted by then: given back when the response closed, a login whose
    // client hung up while its password was compared held no room, and more failures than the cap were
    // compared and counted.
    const address = addressKey(request.ip);
    const others = loginsInFlight.get(address) ?? 0;
    loginsInFlight.set(address, others + 1);
    holding.set(request, address);
    const spent = await failedLogins(request, { increment: false });
    if (!spent.isAllowed && spent.remaining - others <= 0) throw new RateLimited(Math.max(spent.ttlInSeconds, 1));
    await loginToAccount(request);
  };
  // Counted when the attempt fails, before its answer is written. Counted once the answer had been sent
  // (an `onResponse` hook), an attempt whose client hung up first, its password compared all the same,
  // was never counted, and the cap never reached. Only refusals of what the client sent: the server's own
  // 503s (its hashing threads busy, its database down) counted too locked every user behind a busy
  // address out for 15 minutes.
  const countFailedLogin = async (request: FastifyRequest, _reply: FastifyReply, error: Error) => {
    const { status } = toProblem(error, request);
    if (status < 500 && status !== 429) await failedLogins(request);
  };
  // An `onSend` hook: every answer passes it, a refusal after its `onError` (the count above), whether
  // or not its client is still there to take it.
  const settled = async (request: FastifyRequest, _reply: FastifyReply, payload: unknown) => {
    const address = holding.get(request);
    if (address !== undefined) {
      holding.delete(request);
      const left = loginsInFlight.get(address)! - 1;
      if (left === 0) loginsInFlight.delete(address);
      else loginsInFlight.set(address, left);
    }
    return payload;
  };
  const register = limiter('register', config.RATE_LIMIT_REGISTER, 60 * MINUTE, (request) => addressKey(request.ip));
  const chat = limiter('chat', config.RATE_LIMIT_CHAT, MINUTE, (request) => request.user.id);
  const api = limiter('api', config.RATE_LIMIT_API, MINUTE, (request) => request.user.id);
  const anonymous = limiter('anonymous', config.RATE_LIMIT_API, MINUTE, (request) => addressKey(request.ip));
  // A password guessed through a session is limited like one guessed at login, per account (the caller
  // holds its token, from any address): without it a stolen token could try RATE_LIMIT_API passwords a
  // minute, and any one user keep every hashing thread busy, so that everyone's logins were 503.
  const password = limiter('password', config.RATE_LIMIT_LOGIN, 15 * MINUTE, (request) => request.user.id);

  // Login and register need no token, so authentication does not count them. They, and the password checks
  // of a session, are counted once the body is parsed (the email is part of the login key) and before it is
  // validated: malformed attempts count too.
  const routeLimits = { login, register, password, chat: undefined };
  app.addHook('onRoute', (route) => {
    const group = route.config?.rateLimitGroup;
    const limit = group && routeLimits[group];
    if (limit) route.preValidation = [...[route.preValidation ?? []].flat(), limit];
    if (group === 'login') {
      route.onError = [...[route.onError ?? []].flat(), countFailedLogin];
      route.onSend = [...[route.onSend ?? []].flat(), settled];
    }
  });

  return {
    countUser: (request) => (request.routeOptions.config.rateLimitGroup === 'chat' ? chat(request) : api(request)),
    countAnonymous: anonymous,
  };
}

/**
 * What a client's address is counted by: an IPv4 address as it is; an IPv6 one by its /64, the least a
 * home line, an office or a server is given (its owner may use any address in it, 2^64 of them, each of
 * which was a fresh counter); an IPv4 address written as IPv6 (`::ffff:192.0.2.1`, as a dual-stack
 * socket reports an IPv4 client) as the IPv4 address; either without the port a balancer may have added.
 * Anything that is no IP address is cut to its first MAX_OTHER_ADDRESS characters: with `TRUST_PROXY=true`
 * it is whatever a client wrote first in X-Forwarded-For, up to the headers' 16 KB, and every limit kept a
 * counter keyed by all of it (20,000 of them each: gigabytes).
 */
function addressKey(forwarded: string): string {
  // A balancer may forward the client's address with its port (Azure Application Gateway:
  // `192.0.2.1:51234`, `[2001:db8::1]:51234`): a port of its own each connection, so a counter of its own.
  const ip = /^\[([^\]]+)\]:\d+$/.exec(forwarded)?.[1] ?? /^(\d+\.\d+\.\d+\.\d+):\d+$/.exec(forwarded)?.[1] ?? forwarded;
  if (!isIPv6(ip)) return ip.slice(0, MAX_OTHER_ADDRESS);
  const groups = ipv6Groups(ip.split('%')[0]!);
  if (groups.slice(0, 5).every((group) => group === 0) && groups[5] === 0xffff) {
    return [groups[6]! >> 8, groups[6]! & 0xff, groups[7]! >> 8, groups[7]! & 0xff].join('.');
  }
  return `${groups
    .slice(0, 4)
    .map((group) => group.toString(16))
    .join(':')}::/64`;
}

/** The eight 16-bit groups of a valid IPv6 address: `::` filled in with zeros, a dotted IPv4 end read as two. */
function ipv6Groups(address: string): number[] {
  const read = (part: string) =>
    part === ''
      ? []
      : part.split(':').flatMap((piece) => {
          if (!piece.includes('.')) return [Number.parseInt(piece, 16)];
          const [a, b, c, d] = piece.split('.').map(Number) as [number, number, number, number];
          return [(a << 8) | b, (c << 8) | d];
        });
  const [head = '', tail] = address.split('::');
  const left = read(head);
  if (tail === undefined) return left;
  const right = read(tail);
  return [...left, ...new Array<number>(8 - left.length - right.length).fill(0), ...right];
}

function emailOf(body: unknown): string {
  const email = (body as { email?: unknown } | null | undefined)?.email;
  return typeof email === 'string' ? email.trim().toLowerCase().slice(0, MAX_EMAIL_LENGTH) : '';
}

/**
 * Redis as the counters meet it: its connection lost, or a count it refused (out of memory, a replica's
 * READONLY) or left unanswered for a second, while connected. A failure is logged once, until Redis
 * counts again, and for REDIS_RETRY_MS after it the limits go unchecked without asking Redis: one that
 * takes a second to fail each command would otherwise hold every request for that second.
 */
class RedisHealth {
  private failing = false;
  private restUntil = 0;

  constructor(private readonly log: FastifyBaseLogger) {}

  /** Whether Redis is not to be asked now: it failed less than REDIS_RETRY_MS ago. */
  get resting(): boolean {
    return this.restUntil !== 0 && Date.now() < this.restUntil;
  }

  failed(error: Error & { command?: unknown }): void {
    this.restUntil = Date.now() + REDIS_RETRY_MS;
    if (this.failing) return;
    this.failing = true;
    // ioredis attaches the command that failed to its error, arguments and all: a refused HELLO or AUTH
    // carries the password of REDIS_URL, which the log must not.
    delete error.command;
    this.log.warn({ err: error }, 'Redis is unreachable or failing: rate limits are not enforced until it answers again');
  }

  answered(): void {
    this.restUntil = 0;
    if (!this.failing) return;
    this.failing = false;
    this.log.info('Redis is reachable again: rate limits are enforced');
  }
}

/**
 * A Redis client for the counters that never holds a request back for long: while Redis is unreachable
 * commands fail at once instead of queueing, and one that gets no answer fails after a second (see
 * `RedisHealth`). Waits for the first connection, or its first failure, so that counting starts with the
 * first request.
 */
async function connectRedis(url: string, health: RedisHealth): Promise<Redis> {
  const redis = new Redis(url, {
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    commandTimeout: 1_000,
    connectTimeout: 2_000,
  });
  redis.on('error', (error: Error) => health.failed(error));
  redis.on('ready', () => health.answered());
  await new Promise((resolve) => {
    redis.once('ready', resolve);
    redis.once('error', resolve);
  });
  return redis;
}
