import { randomBytes } from 'node:crypto';
import { accessSync, closeSync, constants, fstatSync, mkdirSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { availableParallelism } from 'node:os';
import { join, resolve } from 'node:path';
import proxyAddr from '@fastify/proxy-addr';
import { parse as parseConnectionString } from 'pg-connection-string';
import { z } from 'zod';
import { MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS } from './providers/models.js';
import { StartupError } from './startup-error.js';
// The words every refusal of a value is said in (the configuration's and the requests').
import './validation-messages.js';

/** Parses a duration such as `7d`, `12h`, `30m`, `45s` or a bare number of seconds into seconds. */
function parseDurationSeconds(value: string): number | undefined {
  const match = /^(\d+)\s*([smhd]?)$/.exec(value.trim());
  if (!match) return undefined;
  const unit = { '': 1, s: 1, m: 60, h: 3600, d: 86400 }[match[2] as '' | 's' | 'm' | 'h' | 'd'];
  const seconds = Number(match[1]) * unit;
  return seconds > 0 ? seconds : undefined;
}

/**
 * Read by the driver's own parser. What it cannot read passed a check of the scheme alone, and the
 * service then stopped at its first connection with a stack trace that did not name the variable.
 */
function readableByDriver(url: string): boolean {
  try {
    parseConnectionString(url);
    return true;
  } catch {
    return false;
  }
}

/**
 * A URL ioredis connects by as it reads it: its path, when there is one, the database's number, and so
 * its `db` parameter. What passed a check of the scheme alone stopped the service with a stack trace
 * (`redis://host:port6379`), or took it down when Redis answered its `SELECT NaN` (`redis://host/abc`),
 * at the start or later, once an unreachable Redis came back.
 */
function redisConnectable(url: string): boolean {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return false;
  }
  const db = parsed.searchParams.get('db');
  return /^\/?(\d{1,5})?$/.test(parsed.pathname) && (db === null || /^\d{1,5}$/.test(db)) && parsed.hostname !== '';
}

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const optionalText = z
  .string()
  .trim()
  .transform((v) => (v === '' ? undefined : v))
  .optional();
const commaList = (value: string) =>
  value
    .split(',')
    .map((item) => item.trim())
    .filter(Boolean);

/** `*`, or origins exactly as browsers send them: scheme, host and port, no path. */
const corsOrigins = optionalText.pipe(
  z
    .string()
    .transform(commaList)
    .pipe(
      z.array(
        z.string().refine((origin) => origin === '*' || isOrigin(origin), 'must list origins such as https://app.example.com, or *'),
      ),
    )
    .optional(),
);

function isOrigin(value: string): boolean {
  try {
    const url = new URL(value);
    return (url.protocol === 'http:' || url.protocol === 'https:') && url.origin === value;
  } catch {
    return false;
  }
}

/**
 * Fastify's trustProxy: `true`, the number of proxies in front, or their addresses and CIDR ranges.
 * A list is compiled here, by the same proxy-addr Fastify compiles it with when the app is built:
 * an address it cannot read (`yes`, `10.0.0.0/33`) is one line naming the variable, not a stack trace.
 */
const trustProxy = optionalText.transform((value, ctx): boolean | ((address: string, hop: number) => boolean) => {
  if (value === undefined || value === 'false') return false;
  if (value === 'true') return true;
  if (/^\d+$/.test(value)) {
    const hops = Number(value);
    return (_address, hop) => hop < hops;
  }
  try {
    return proxyAddr.compile(commaList(value));
  } catch (error) {
    ctx.addIssue({
      code: 'custom',
      message: `must be true, false, a number of proxies, or addresses and CIDR ranges (${(error as Error).message})`,
    });
    return z.NEVER;
  }
});

/**
 * A provider's address. `z.url()` alone takes any scheme: `ftp:`, `file:///etc/passwd`, `mailto:`. Calls
 * go to paths under its own, on its origin: a user and password, a query (`?api-version=`) or a fragment
 * would be dropped without a word (a proxy's basic auth missing from every call: each one a 502), so
 * they are refused.
 */
const httpUrl = z
  .url({ protocol: /^https?$/, message: 'must be an http(s) URL', abort: true })
  .refine(
    (value) => {
      const url = new URL(value);
      return !url.username && !url.password && !url.search && !url.hash;
    },
    { message: 'must be an http(s) URL without a user, password, query or fragment: calls go to paths under its own; the key goes in the API key variable' },
  )
  .optional();

/** Dot-separated labels of letters, digits and inner hyphens (RFC 1123), at most 253 characters. */
const HOST_NAME = /^(?=.{1,253}\.?$)[a-z\d]([a-z\d-]{0,61}[a-z\d])?(\.[a-z\d]([a-z\d-]{0,61}[a-z\d])?)*\.?$/i;

/** The longest JWT_EXPIRES_IN: a year. */
const MAX_TOKEN_LIFETIME_SECONDS = 365 * 86_400;

/**
 * A provider's API key, sent as an HTTP header: visible ASCII, as every provider's is. One pasted with
 * typographic quotes or a space in it was taken, and every chat then failed at the upstream (a 502).
 */
const providerKey = optionalText.pipe(
  z
    .string()
    .regex(/^[\x21-\x7e]+$/, 'must be visible ASCII characters with no spaces, as a key is (pasted with quotes or spaces around it?)')
    .optional(),
);

const envSchema = z.object({
  NODE_ENV: z.enum(['development', 'production', 'test']).default('development'),
  PORT: int(0, 65535).default(3000),
  // Checked here: Node reads anything else (`foo bar`, `[::1]`) as a name to resolve, and fails only in listen.
  HOST: z
    .string()
    .trim()
    .default('0.0.0.0')
    .refine((host) => isIP(host) !== 0 || HOST_NAME.test(host), 'must be an IP address (0.0.0.0, ::, 127.0.0.1) or a host name'),
  DATABASE_URL: optionalText.pipe(
    z
      .string()
      .regex(/^postgres(ql)?:\/\//, 'must be a postgres:// or postgresql:// URL')
      .refine(
        readableByDriver,
        'is not a URL the PostgreSQL driver can read: a port that is not a number, a character such as # / ? @ in the user or password not percent-encoded (%23 %2F %3F %40), or an SSL file that cannot be read',
      )
      .optional(),
  ),
  DATABASE_QUERY_TIMEOUT_MS: int(100, 3_600_000).default(60_000),
  DATA_DIR: z.string().min(1).default('./data'),
  JWT_SECRET: optionalText.pipe(z.string().min(32, 'must be at least 32 characters').optional()),
  JWT_EXPIRES_IN: z
    .string()
    .default('7d')
    .transform((v, ctx) => {
      const seconds = parseDurationSeconds(v);
      // Bounded: past it, 400 digits were Infinity, and fast-jwt then signed tokens with no `exp` that
      // its own verification refused.
      if (seconds === undefined || seconds > MAX_TOKEN_LIFETIME_SECONDS) {
        ctx.addIssue({ code: 'custom', message: 'must be a duration like 7d, 12h, 30m or 3600, at most 365d' });
        return z.NEVER;
      }
      return seconds;
    }),
  BCRYPT_ROUNDS: int(4, 15).default(12),
  // As many hashing threads as CPUs this process may use (fewer under taskset or a container's cpuset),
  // at most libuv's own pool size: at the lowest priority they take only CPU time the event loop leaves.
  PASSWORD_HASH_THREADS: int(1, 64).default(() => Math.min(4, availableParallelism())),
  PASSWORD_HASH_QUEUE: int(0, 100_000).default(64),
  AI_PROVIDER: z.enum(['openai', 'openrouter']).default('openai'),
  OPENAI_API_KEY: providerKey,
  OPENROUTER_API_KEY: providerKey,
  AI_BASE_URL: optionalText.pipe(httpUrl),
  OPENAI_BASE_URL: optionalText.pipe(httpUrl),
  AI_MODEL: optionalText,
  AI_TIMEOUT_MS: int(100, 3_600_000).default(60_000),
  AI_MAX_RETRIES: int(0, 10).default(2),
  AI_CONTEXT_TOKENS: int(256, 10_000_000).optional(),
  AI_MAX_OUTPUT_TOKENS: int(1, 1_000_000).default(1024),
  HISTORY_CACHE_MB: int(0, 1_000_000).default(64),
  FILE_MAX_BYTES: int(1, 1024 ** 3).default(20 * 1024 * 1024),
  // How much one account may hold: one more create is 409 CONFLICT naming the variable.
  MAX_PROJECTS_PER_USER: int(1, 1_000_000).default(1000),
  MAX_PROMPTS_PER_PROJECT: int(1, 100_000).default(100),
  MAX_FILES_PER_PROJECT: int(1, 1_000_000).default(1000),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  // What GET /metrics takes as `Authorization: Bearer …` when set: a token a scraper holds, not a user's.
  METRICS_TOKEN: optionalText.pipe(
    z
      .string()
      .regex(/^[\x21-\x7e]{16,1024}$/, 'must be 16 to 1,024 visible ASCII characters, no spaces (e.g. openssl rand -hex 32)')
      .optional(),
  ),
  REDIS_URL: optionalText.pipe(
    z
      .string()
      .regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL')
      .refine(redisConnectable, 'is not a Redis URL: redis://[[user]:password@]host[:port][/database], the port and the database numbers, reserved characters in the password percent-encoded')
      .optional(),
  ),
  REDIS_KEY_PREFIX: z.string().min(1).default('chatbot:'),
  RATE_LIMIT_LOGIN: int(1, 1_000_000).default(10),
  RATE_LIMIT_REGISTER: int(1, 1_000_000).default(20),
  RATE_LIMIT_CHAT: int(1, 1_000_000).default(60),
  RATE_LIMIT_API: int(1, 10_000_000).default(1200),
  // Chats one user may have running at once in this process. 32: a person (a few tabs) or a script using
  // all of RATE_LIMIT_CHAT (60 a minute) with replies of up to 30 s stays under it; past it are chats
  // piling up (streams held open, an upstream that hangs), each holding memory and an upstream connection.
  CHAT_CONCURRENCY_PER_USER: int(1, 1_000_000).default(32),
  // Between SIGTERM and the shutdown: requests still served and /health answering 503, so that a load
  // balancer that learns of the stop late (Kubernetes' endpoints, a target group) sends none to a closed port.
  SHUTDOWN_DELAY_MS: int(0, 600_000).default(0),
  SHUTDOWN_TIMEOUT_MS: int(0, 600_000).default(10_000),
  REQUEST_TIMEOUT_MS: int(100, 3_600_000).default(300_000),
  CORS_ORIGINS: corsOrigins,
  TRUST_PROXY: trustProxy,
  MAX_EVENT_LOOP_DELAY_MS: int(0, 60_000).default(1000),
});

type Env = z.infer<typeof envSchema>;

/** Every variable the service reads: `.env.example` documents each (test/config.test.ts holds it to that). */
export const CONFIG_VARIABLES = Object.keys(envSchema.shape);

/** What the database commands (migrate, backup, restore) read: the environment without the JWT secret. */
export type Environment = Omit<Env, 'JWT_SECRET' | 'DATA_DIR'> & {
  DATA_DIR: string;
};

export type Config = Environment & {
  JWT_SECRET: string;
};

/**
 * A production JWT secret has at least this many different characters: long but repetitive ones
 * (`xxxx…`, `changemechangeme…`) are guessed, not random. 64 random hex digits have all 16.
 */
const MIN_SECRET_CHARACTERS = 10;

/**
 * Words of the placeholders that guides and templates ship (`your-super-secret-jwt-key-change-this-in-production`),
 * which have all the different characters a random secret has, and are in the word lists that guess
 * JWT secrets offline. A random secret holds one of them about once in ten million.
 */
const PLACEHOLDER_WORDS = /change|secret|example|placeholder|replace|default|password|insecure|sample/i;

/**
 * Whether half or more of a secret's neighbouring characters are the same or next to each other
 * (`aaaa`, `abcd`, `4321`): a run typed along a keyboard's row or the alphabet, which the other checks
 * let through (`abcdefghijklmnopqrstuvwxyz0123456789` has 36 different characters). Of a random
 * secret's pairs about 3 in 64 are (base64; 3 in 16 of hex), and half of them all about never.
 */
function inSequence(secret: string): boolean {
  let near = 0;
  for (let i = 1; i < secret.length; i++) if (Math.abs(secret.charCodeAt(i) - secret.charCodeAt(i - 1)) <= 1) near++;
  return near * 2 >= secret.length - 1;
}

/** Thrown when the environment cannot start the service; its message is the one line to show. */
export class ConfigError extends StartupError {
  override name = 'ConfigError';
}

/**
 * Reads and validates the environment. Outside production a missing JWT secret is generated once
 * and kept under DATA_DIR, so tokens survive restarts of a laptop install.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const { values: environment, named } = readEnvironment(env, SECRET_VARIABLES);
  const { JWT_SECRET: given, ...values } = environment;
  let secret = given;
  if (!secret) {
    if (values.NODE_ENV === 'production') {
      throw new ConfigError('Invalid configuration: JWT_SECRET is required when NODE_ENV=production (at least 32 characters; or JWT_SECRET_FILE, a file that holds it)');
    }
    secret = loadOrCreateSecret(values.DATA_DIR);
  } else if (values.NODE_ENV === 'production') {
    const placeholderWord = PLACEHOLDER_WORDS.exec(secret)?.[0];
    const why =
      new Set(secret).size < MIN_SECRET_CHARACTERS
        ? `at least ${MIN_SECRET_CHARACTERS} different characters`
        : placeholderWord
          ? `not a placeholder (it contains "${placeholderWord}")`
          : inSequence(secret) && 'not characters in sequence or repeated (half of it is: "abcd", "1234", "aaaa")';
    if (why) throw new ConfigError(`Invalid configuration: ${named('JWT_SECRET')} must be random: ${why} (e.g. openssl rand -base64 48)`);
  }
  return { ...values, JWT_SECRET: secret };
}

/**
 * Reads and validates the environment but for the JWT secret, which the database commands neither need
 * nor make: read through loadConfig, a backup or a restore pointed at a wrong DATA_DIR created it, and
 * a secret in it.
 */
export function loadEnvironment(env: NodeJS.ProcessEnv = process.env): Environment {
  // Nor its file: a migration job given the service's variables need not mount the JWT secret.
  const { JWT_SECRET: _secret, ...values } = readEnvironment(env, SECRET_VARIABLES.filter((name) => name !== 'JWT_SECRET')).values;
  return values;
}

/**
 * The environment validated, with `secrets` read from their files where a `<name>_FILE` names one; and
 * how a refusal names a variable: with the file it came from, where it did.
 */
function readEnvironment(
  env: NodeJS.ProcessEnv,
  secrets: readonly SecretVariable[],
): { values: Environment & Pick<Env, 'JWT_SECRET'>; named: (variable: string) => string } {
  const fromFiles = secretsFromFiles(env, secrets);
  const named = (variable: string) => (Object.hasOwn(fromFiles, variable) ? `${variable} (from ${variable}_FILE)` : variable);
  // Empty or blank is unset, whatever the variable: compose writes `${VAR:-}` for one it was not given,
  // and `z.coerce.number()` would read "" as 0 (a random port, load shedding off).
  const parsed = envSchema.safeParse(Object.fromEntries(Object.entries({ ...env, ...fromFiles }).filter(([, value]) => value?.trim())));
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const variable = String(issue.path[0] ?? 'environment');
    throw new ConfigError(`Invalid configuration: ${named(variable)} ${issue.message}`);
  }
  const values = parsed.data;
  // A context no larger than what is kept for the reply leaves no room for even a one-token message:
  // every chat would be 400 CONTEXT_TOO_LONG (see ChatService's budget).
  const minContext = values.AI_MAX_OUTPUT_TOKENS + REPLY_PRIMING_TOKENS + MESSAGE_OVERHEAD_TOKENS + 1;
  if (values.AI_CONTEXT_TOKENS !== undefined && values.AI_CONTEXT_TOKENS < minContext) {
    throw new ConfigError(
      `Invalid configuration: AI_CONTEXT_TOKENS must leave room for a message besides the AI_MAX_OUTPUT_TOKENS (${values.AI_MAX_OUTPUT_TOKENS}) kept for the reply: at least ${minContext}`,
    );
  }
  return { values: { ...values, DATA_DIR: resolve(values.DATA_DIR) }, named };
}

/**
 * The variables that hold a secret. Each may be given as a file instead, `<name>_FILE` naming it, as
 * Docker's and Kubernetes' secrets are mounted (`JWT_SECRET_FILE=/run/secrets/jwt_secret`): then the
 * secret is not in the service's environment, which `docker inspect`, `/proc/<pid>/environ` and its
 * child processes can read.
 */
export const SECRET_VARIABLES = ['JWT_SECRET', 'DATABASE_URL', 'REDIS_URL', 'OPENAI_API_KEY', 'OPENROUTER_API_KEY', 'METRICS_TOKEN'] as const;
/** The longest secret file read: far past any key or URL, short of a file named by mistake (a log, a dump). */
const MAX_SECRET_FILE_BYTES = 64 * 1024;

type SecretVariable = (typeof SECRET_VARIABLES)[number];

/** Of `secrets`, those that a `<name>_FILE` names a file for, read from it. */
function secretsFromFiles(env: NodeJS.ProcessEnv, secrets: readonly SecretVariable[]): Partial<Record<SecretVariable, string>> {
  const read: Partial<Record<SecretVariable, string>> = {};
  for (const name of secrets) {
    const path = env[`${name}_FILE`]?.trim();
    if (!path) continue;
    if (env[name]?.trim()) throw new ConfigError(`Invalid configuration: ${name} and ${name}_FILE are both set; set one of them`);
    read[name] = readSecretFile(name, path);
  }
  return read;
}

const UTF8 = new TextDecoder('utf-8', { fatal: true });
/** A line break or another control character: a file holding more than the value (`KEY=value` lines, two secrets). */
const CONTROL_CHARACTER = /\p{Cc}/u;

/**
 * The secret in the file at `path`, without the blanks around it (the line end that `echo` and editors
 * put after it). Never shown: a refusal names the path, not what the file holds.
 */
function readSecretFile(name: SecretVariable, path: string): string {
  const refuse = (why: string) => new ConfigError(`Invalid configuration: ${name}_FILE ${path} ${why}`);
  let bytes: Buffer;
  try {
    // Not blocking: a FIFO would hold the start, waiting for a writer, signals unheard.
    const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
    try {
      // A FIFO, a device or a folder holds no secret; what is checked is what is read, not the path again.
      if (!fstatSync(fd).isFile()) throw refuse('is not a regular file');
      bytes = readAtMost(fd, MAX_SECRET_FILE_BYTES + 1);
    } finally {
      closeSync(fd);
    }
  } catch (error) {
    throw error instanceof ConfigError ? error : refuse(`cannot be read: ${(error as Error).message}`);
  }
  if (bytes.length > MAX_SECRET_FILE_BYTES) throw refuse(`is longer than a secret (over ${MAX_SECRET_FILE_BYTES / 1024} KiB)`);
  let secret: string;
  try {
    secret = UTF8.decode(bytes).trim();
  } catch {
    throw refuse('is not UTF-8 text');
  }
  if (!secret) throw refuse('is empty');
  if (CONTROL_CHARACTER.test(secret) || secret.startsWith(`${name}=`)) throw refuse(`holds more than the value (${name}=… or more than one line): it must hold the value alone`);
  return secret;
}

/** Up to `limit` bytes from the file open at `fd`: a file that reports no size (under /proc) is read as far as that too. */
function readAtMost(fd: number, limit: number): Buffer {
  const buffer = Buffer.alloc(limit);
  let length = 0;
  let got: number;
  do {
    got = readSync(fd, buffer, length, limit - length, null);
    length += got;
  } while (got > 0 && length < limit);
  return buffer.subarray(0, length);
}

/** How long a secret file found shorter than a secret is given to be written whole, before it is replaced. */
const PARTIAL_SECRET_WAIT_MS = 2_000;
const PARTIAL_SECRET_RETRY_MS = 50;

/**
 * DATA_DIR/jwt-secret, made once when there is none. Instances started at once on one DATA_DIR each found
 * none and each kept a secret of its own, refusing the others' tokens: the file is now created only
 * where there is none, and whoever finds it made reads it, waiting while it is shorter than a secret (its
 * writer not done yet). One that stays short (cut, edited by hand) is replaced.
 */
function loadOrCreateSecret(dataDir: string): string {
  const file = join(dataDir, 'jwt-secret');
  for (let waited = 0; ; waited += PARTIAL_SECRET_RETRY_MS) {
    let stored: string | undefined;
    try {
      stored = readFileSync(file, 'utf8').trim();
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw unusableDataDir(dataDir, error);
    }
    if (stored !== undefined && stored.length >= 32) return stored;
    requireWritableDataDir(dataDir);
    const secret = randomBytes(48).toString('base64url');
    if (stored === undefined) {
      try {
        writeFileSync(file, secret + '\n', { mode: 0o600, flag: 'wx' });
        return secret;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw unusableDataDir(dataDir, error);
        continue; // made meanwhile by another process: its secret is the one
      }
    }
    if (waited >= PARTIAL_SECRET_WAIT_MS) {
      writeFileSync(file, secret + '\n', { mode: 0o600 });
      return secret;
    }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, PARTIAL_SECRET_RETRY_MS);
  }
}

/**
 * Creates DATA_DIR if need be and checks that this process may write there, as the server must (the
 * embedded database, its lock, uploads). A volume owned by another user is one line naming the
 * variable, not a stack trace from wherever the first write happens.
 */
export function requireWritableDataDir(dataDir: string): void {
  try {
    mkdirSync(dataDir, { recursive: true });
    accessSync(dataDir, constants.W_OK);
  } catch (error) {
    throw unusableDataDir(dataDir, error);
  }
}

const unusableDataDir = (dataDir: string, error: unknown) =>
  new ConfigError(`Invalid configuration: DATA_DIR ${dataDir} is not a folder this process can write to: ${(error as Error).message}`);
