import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CONFIG_VARIABLES, ConfigError, loadConfig, loadEnvironment, SECRET_VARIABLES } from '../src/config.js';

const dataDir = () => mkdtempSync(join(tmpdir(), 'chatbot-config-'));

describe('loadConfig', () => {
  it('has the contract defaults', () => {
    const config = loadConfig({ DATA_DIR: dataDir() });
    expect(config).toMatchObject({
      PORT: 3000,
      HOST: '0.0.0.0',
      JWT_EXPIRES_IN: 7 * 24 * 3600,
      BCRYPT_ROUNDS: 12,
      AI_PROVIDER: 'openai',
      AI_TIMEOUT_MS: 60_000,
      AI_MAX_RETRIES: 2,
      AI_MAX_OUTPUT_TOKENS: 1024,
      FILE_MAX_BYTES: 20 * 1024 * 1024,
      RATE_LIMIT_LOGIN: 10,
      RATE_LIMIT_REGISTER: 20,
      RATE_LIMIT_CHAT: 60,
      RATE_LIMIT_API: 1200,
      CHAT_CONCURRENCY_PER_USER: 32,
      PASSWORD_HASH_QUEUE: 64,
      PASSWORD_HASH_THREADS: Math.min(4, availableParallelism()),
      MAX_PROJECTS_PER_USER: 1000,
      MAX_PROMPTS_PER_PROJECT: 100,
      MAX_FILES_PER_PROJECT: 1000,
    });
    expect(config.DATABASE_URL).toBeUndefined();
    expect(config.AI_CONTEXT_TOKENS).toBeUndefined();
  });

  it('treats empty variables as unset', () => {
    const config = loadConfig({ DATA_DIR: dataDir(), DATABASE_URL: '', OPENAI_API_KEY: ' ', JWT_SECRET: '' });
    expect(config.DATABASE_URL).toBeUndefined();
    expect(config.OPENAI_API_KEY).toBeUndefined();
    expect(config.JWT_SECRET.length).toBeGreaterThanOrEqual(32);
  });

  it('treats empty or blank variables as unset: their defaults apply (an integer is not 0)', () => {
    // Compose passes a variable it was not given as "" (`${VAR:-}`).
    const defaults = loadConfig({ DATA_DIR: dataDir() });
    const integers = [
      'PORT',
      'BCRYPT_ROUNDS',
      'PASSWORD_HASH_THREADS',
      'PASSWORD_HASH_QUEUE',
      'AI_TIMEOUT_MS',
      'AI_MAX_RETRIES',
      'AI_CONTEXT_TOKENS',
      'AI_MAX_OUTPUT_TOKENS',
      'HISTORY_CACHE_MB',
      'FILE_MAX_BYTES',
      'MAX_PROJECTS_PER_USER',
      'MAX_PROMPTS_PER_PROJECT',
      'MAX_FILES_PER_PROJECT',
      'RATE_LIMIT_LOGIN',
      'RATE_LIMIT_REGISTER',
      'RATE_LIMIT_CHAT',
      'RATE_LIMIT_API',
      'CHAT_CONCURRENCY_PER_USER',
      'SHUTDOWN_TIMEOUT_MS',
      'MAX_EVENT_LOOP_DELAY_MS',
    ] as const;
    for (const blank of ['', ' ', '\t ']) {
      const config = loadConfig({ DATA_DIR: dataDir(), ...Object.fromEntries(integers.map((name) => [name, blank])) });
      for (const name of integers) expect([name, config[name]]).toEqual([name, defaults[name]]);
    }
    expect(defaults).toMatchObject({ HISTORY_CACHE_MB: 64, SHUTDOWN_TIMEOUT_MS: 10_000, MAX_EVENT_LOOP_DELAY_MS: 1000 });
    // The text ones too, those with a default included.
    const texts = ['NODE_ENV', 'HOST', 'JWT_EXPIRES_IN', 'AI_PROVIDER', 'LOG_LEVEL', 'REDIS_KEY_PREFIX'] as const;
    const config = loadConfig({ DATA_DIR: dataDir(), ...Object.fromEntries(texts.map((name) => [name, ' '])) });
    for (const name of texts) expect([name, config[name]]).toEqual([name, defaults[name]]);
  });

  it.each([
    ['PORT', 'eighty'],
    ['PORT', '70000'],
    ['DATABASE_URL', 'mysql://localhost/x'],
    // Each of these passed, then stopped the start at the first connection with a stack trace.
    ['DATABASE_URL', 'postgres://postgres@127.0.0.1:notaport/x'],
    ['DATABASE_URL', 'postgres://postgres:s3cr#t@127.0.0.1:5432/x'],
    ['JWT_SECRET', 'too-short'],
    ['JWT_EXPIRES_IN', 'forever'],
    ['BCRYPT_ROUNDS', '3'],
    ['PASSWORD_HASH_THREADS', '0'],
    ['PASSWORD_HASH_QUEUE', '-1'],
    ['AI_PROVIDER', 'anthropic'],
    ['AI_BASE_URL', 'not a url'],
    ['AI_TIMEOUT_MS', '-1'],
    ['FILE_MAX_BYTES', '1.5'],
    ['CHAT_CONCURRENCY_PER_USER', '0'],
    ['CHAT_CONCURRENCY_PER_USER', '1000001'],
    ['MAX_PROJECTS_PER_USER', '0'],
    ['MAX_PROJECTS_PER_USER', '1000001'],
    ['MAX_PROMPTS_PER_PROJECT', '100001'],
    ['MAX_PROMPTS_PER_PROJECT', 'many'],
    ['MAX_FILES_PER_PROJECT', '0'],
    ['MAX_FILES_PER_PROJECT', '2.5'],
    ['LOG_LEVEL', 'loud'],
    ['METRICS_TOKEN', 'short'],
    ['METRICS_TOKEN', 'a token with spaces in it'],
    ['REDIS_URL', 'http://x'],
    // Each of these passed, then stopped the start with a stack trace, or ended the process when Redis
    // answered its SELECT NaN (at the start, or once an unreachable Redis came back).
    ['REDIS_URL', 'redis://127.0.0.1:notaport'],
    ['REDIS_URL', 'rediss://[::1'],
    ['REDIS_URL', 'redis://127.0.0.1:6379/abc'],
    ['REDIS_URL', 'redis://127.0.0.1:6379/1.5'],
    ['REDIS_URL', 'redis://127.0.0.1:6379?db=two'],
    ['NODE_ENV', 'staging'],
    // Each of these started, then failed later with a stack trace (Fastify's first request, or listen).
    ['TRUST_PROXY', 'yes'],
    ['TRUST_PROXY', '10.0.0.0/33'],
    ['TRUST_PROXY', '127.0.0.1,proxy.example.com'],
    ['HOST', 'foo bar'],
    ['HOST', '[::1]'],
    ['HOST', 'http://localhost'],
    // Each of these started, then failed every request it governs.
    ['AI_BASE_URL', 'ftp://models.example.com/v1'],
    ['AI_BASE_URL', 'file:///etc/passwd'],
    ['OPENAI_BASE_URL', 'mailto:ops@example.com'],
    // Each of these passed, and then what follows the origin and path never reached the provider.
    ['AI_BASE_URL', 'http://alice:s3cret@proxy.internal/v1'],
    ['AI_BASE_URL', 'http://llm.internal/v1?api-version=2024-06-01'],
    ['OPENAI_BASE_URL', 'https://gateway.example.com/v1#main'],
    ['JWT_EXPIRES_IN', '9'.repeat(400)],
    ['JWT_EXPIRES_IN', '366d'],
  ])('refuses %s=%s with one line naming the variable', (variable, value) => {
    let error: unknown;
    try {
      loadConfig({ DATA_DIR: dataDir(), [variable]: value });
    } catch (caught) {
      error = caught;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const message = (error as Error).message;
    expect(message).toMatch(new RegExp(`^Invalid configuration: ${variable} `));
    expect(message).not.toContain('\n');
  });

  it('accepts the forms of REDIS_URL that ioredis takes', () => {
    for (const url of ['redis://127.0.0.1', 'redis://:p%40ss@redis.internal:6380/2', 'rediss://user:pass@[::1]:6379/', 'redis://redis?db=3&family=6']) {
      expect(loadConfig({ DATA_DIR: dataDir(), REDIS_URL: url }).REDIS_URL, url).toBe(url);
    }
  });

  it('accepts the forms of DATABASE_URL that the driver takes, and names no password when it refuses one (nor a provider\'s)', () => {
    for (const url of [
      'postgresql://app:p%23ss@db.internal:6432/chat?sslmode=verify-full',
      'postgres://app@/chat?host=/var/run/postgresql',
      'postgres://[::1]:5432/chat',
    ]) {
      expect(loadConfig({ DATA_DIR: dataDir(), DATABASE_URL: url }).DATABASE_URL).toBe(url);
    }
    expect(() => loadConfig({ DATA_DIR: dataDir(), DATABASE_URL: 'postgres://app:hunter2#x@db:5432/chat' })).toThrow(
      expect.objectContaining({ message: expect.not.stringContaining('hunter2') }),
    );
    expect(() => loadConfig({ DATA_DIR: dataDir(), AI_BASE_URL: 'http://app:hunter2@proxy.internal/v1' })).toThrow(
      expect.objectContaining({ message: expect.not.stringContaining('hunter2') }),
    );
  });

  it('accepts the forms of TRUST_PROXY and HOST that Fastify and Node take', () => {
    const trust = (value: string) => loadConfig({ DATA_DIR: dataDir(), TRUST_PROXY: value }).TRUST_PROXY;
    expect(trust('true')).toBe(true);
    expect(trust('false')).toBe(false);
    const list = trust(' 10.0.0.0/8 , loopback, 2001:db8::/32,192.168.1.1/255.255.255.0');
    expect(typeof list).toBe('function');
    const trusts = list as (address: string, hop: number) => boolean;
    expect([trusts('10.1.2.3', 0), trusts('127.0.0.1', 0), trusts('2001:db8::1', 1), trusts('192.168.1.7', 0)]).toEqual([true, true, true, true]);
    expect(trusts('203.0.113.9', 0)).toBe(false);
    const hops = trust('2') as (address: string, hop: number) => boolean;
    expect([hops('203.0.113.9', 1), hops('203.0.113.9', 2)]).toEqual([true, false]);

    const host = (value: string) => loadConfig({ DATA_DIR: dataDir(), HOST: value }).HOST;
    expect([host(' 127.0.0.1 '), host('::'), host('localhost'), host('app.internal.example.')]).toEqual([
      '127.0.0.1',
      '::',
      'localhost',
      'app.internal.example.',
    ]);
  });

  it('requires a strong JWT_SECRET in production', () => {
    expect(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir() })).toThrow(/JWT_SECRET is required/);
    expect(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET: 'x'.repeat(31) })).toThrow(/JWT_SECRET/);
    // Long enough, but not random.
    for (const weak of ['x'.repeat(32), 'changeme'.repeat(8), '0123456789'.repeat(4).slice(0, 32).replace(/9/g, '0')]) {
      expect(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET: weak })).toThrow(
        /^Invalid configuration: JWT_SECRET must be random: at least 10 different characters/,
      );
    }
    // Different characters enough, but a template's placeholder: in the word lists that guess JWT secrets.
    for (const placeholder of ['your-super-secret-jwt-key-change-this-in-production', 'MyCompanyJwtKey-2024-PLEASE-CHANGE-ME']) {
      expect(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET: placeholder })).toThrow(
        /^Invalid configuration: JWT_SECRET must be random: not a placeholder \(it contains "(secret|CHANGE)"\)/,
      );
    }
    // Different characters enough, no placeholder, but half of it in sequence or repeated: typed, not random.
    for (const typed of ['abcdefghijklmnopqrstuvwxyz0123456789', '0123456789'.repeat(3) + '0123', 'abcdefghij'.repeat(4), `${'x'.repeat(24)}1234567890`]) {
      expect(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET: typed }), typed).toThrow(
        /^Invalid configuration: JWT_SECRET must be random: not characters in sequence or repeated/,
      );
    }
    const hex = '9252f780a99ef3d3978d0a8e884c9c2b5bf0bc0d0a5bfad0c8861ba8948142b9'; // openssl rand -hex 32
    expect(loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET: hex }).JWT_SECRET).toBe(hex);
    const generated = 'MUdCsXOE6AzCWL4nLcUJ/+zjG+U0gnoNhkThCRXNJtBZItHaT0i1OxeD5kTicIPJ'; // openssl rand -base64 48
    expect(loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET: generated }).JWT_SECRET).toBe(generated);
    // Outside production a developer's placeholder still starts the service.
    expect(loadConfig({ NODE_ENV: 'development', DATA_DIR: dataDir(), JWT_SECRET: 'x'.repeat(32) }).JWT_SECRET).toBe('x'.repeat(32));
    const template = 'your-super-secret-jwt-key-change-this-in-production';
    expect(loadConfig({ NODE_ENV: 'development', DATA_DIR: dataDir(), JWT_SECRET: template }).JWT_SECRET).toBe(template);
  });

  it('refuses a provider key that no header can carry (a space, typographic quotes, a letter past ASCII), without showing it', () => {
    for (const [variable, key] of [['OPENAI_API_KEY', 'sk-abc def'], ['OPENAI_API_KEY', 'sk-fake-“quoted”'], ['OPENROUTER_API_KEY', 'sk-or-clé']]) {
      let message = '';
      try {
        loadConfig({ DATA_DIR: dataDir(), [variable!]: key });
      } catch (error) {
        message = (error as Error).message;
      }
      expect(message, key).toMatch(new RegExp(`^Invalid configuration: ${variable} must be visible ASCII characters with no spaces`));
      expect(message).not.toContain(key);
    }
    expect(loadConfig({ DATA_DIR: dataDir(), OPENAI_API_KEY: ' ollama \n' }).OPENAI_API_KEY).toBe('ollama');
  });

  describe('secrets from files (<name>_FILE)', () => {
    const hex = '9252f780a99ef3d3978d0a8e884c9c2b5bf0bc0d0a5bfad0c8861ba8948142b9';
    const secrets: Record<(typeof SECRET_VARIABLES)[number], string> = {
      JWT_SECRET: hex,
      DATABASE_URL: 'postgres://chatbot:p%40ss@db.internal:5432/chatbot',
      REDIS_URL: 'redis://:s3cret@cache.internal:6379/0',
      OPENAI_API_KEY: 'sk-from-a-file',
      OPENROUTER_API_KEY: 'sk-or-from-a-file',
      METRICS_TOKEN: 'a-scrapers-token-0123456789',
    };
    const fifo = () => {
      const path = join(dataDir(), 'fifo');
      execFileSync('mkfifo', [path]);
      return path;
    };
    /** A file holding `content`, as a mounted secret is; its path. */
    const secretFile = (content: string | Buffer) => {
      const path = join(dataDir(), 'secret');
      writeFileSync(path, content, { mode: 0o600 });
      return path;
    };

    it('reads each secret from the file its _FILE names, less the line end after it, in production too', () => {
      const files = Object.fromEntries(Object.entries(secrets).map(([name, value], i) => [`${name}_FILE`, secretFile(value + (i % 2 ? '\r\n' : '\n'))]));
      const config = loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), ...files });
      expect(Object.fromEntries(SECRET_VARIABLES.map((name) => [name, config[name]]))).toEqual(secrets);
      // The database commands read theirs the same way.
      expect(loadEnvironment({ DATA_DIR: dataDir(), DATABASE_URL_FILE: files.DATABASE_URL_FILE }).DATABASE_URL).toBe(secrets.DATABASE_URL);
      // A file's content is checked as the variable's would be, and a refusal says where it came from.
      expect(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dataDir(), JWT_SECRET_FILE: secretFile('x'.repeat(40)) })).toThrow(
        /^Invalid configuration: JWT_SECRET \(from JWT_SECRET_FILE\) must be random/,
      );
      expect(() => loadConfig({ DATA_DIR: dataDir(), REDIS_URL_FILE: secretFile('http://cache:6379') })).toThrow(
        /^Invalid configuration: REDIS_URL \(from REDIS_URL_FILE\) must be a redis:\/\//,
      );
    });

    it('leaves the JWT secret\'s file to the server: the database commands neither read nor need it', () => {
      const environment = loadEnvironment({ DATA_DIR: dataDir(), JWT_SECRET_FILE: join(dataDir(), 'not-mounted-here') });
      expect(environment).not.toHaveProperty('JWT_SECRET');
    });

    it('refuses, in one line naming the variable and the path but never a secret, a file that cannot be read, is empty or is too long, and a secret given both ways', () => {
      const missing = join(dataDir(), 'no-such-secret');
      const refusals: [Record<string, string>, RegExp][] = [
        [{ JWT_SECRET_FILE: missing }, /^Invalid configuration: JWT_SECRET_FILE \S+no-such-secret cannot be read: ENOENT/],
        [{ JWT_SECRET_FILE: dataDir() }, /^Invalid configuration: JWT_SECRET_FILE \S+ is not a regular file$/],
        // A FIFO would wait for a writer for ever, the start held and signals unheard.
        [{ JWT_SECRET_FILE: fifo() }, /^Invalid configuration: JWT_SECRET_FILE \S+ is not a regular file$/],
        [{ OPENAI_API_KEY_FILE: secretFile('\n') }, /^Invalid configuration: OPENAI_API_KEY_FILE \S+ is empty$/],
        [{ OPENAI_API_KEY_FILE: secretFile(`OPENAI_API_KEY=${hex}\nOPENROUTER_API_KEY=${hex}\n`) }, /^Invalid configuration: OPENAI_API_KEY_FILE \S+ holds more than the value/],
        [{ OPENAI_API_KEY_FILE: secretFile(`OPENAI_API_KEY=${hex}\n`) }, /^Invalid configuration: OPENAI_API_KEY_FILE \S+ holds more than the value \(OPENAI_API_KEY=… or more than one line\)/],
        [{ OPENAI_API_KEY_FILE: secretFile(Buffer.from([0x73, 0x6b, 0xff, 0xfe])) }, /^Invalid configuration: OPENAI_API_KEY_FILE \S+ is not UTF-8 text$/],
        [{ METRICS_TOKEN_FILE: secretFile(Buffer.alloc(64 * 1024 + 1, 'a')) }, /^Invalid configuration: METRICS_TOKEN_FILE \S+ is longer than a secret \(over 64 KiB\)$/],
        [{ JWT_SECRET: hex, JWT_SECRET_FILE: secretFile(hex) }, /^Invalid configuration: JWT_SECRET and JWT_SECRET_FILE are both set; set one of them$/],
      ];
      for (const [env, refusal] of refusals) {
        let error: unknown;
        try {
          loadConfig({ DATA_DIR: dataDir(), ...env });
        } catch (thrown) {
          error = thrown;
        }
        expect(error, JSON.stringify(env)).toBeInstanceOf(ConfigError);
        expect((error as Error).message).toMatch(refusal);
        expect((error as Error).message).not.toContain(hex);
      }
    });

    it('takes a _FILE that is empty or blank for unset, as any variable', () => {
      expect(loadConfig({ DATA_DIR: dataDir(), OPENAI_API_KEY: 'sk-env', OPENAI_API_KEY_FILE: ' ' }).OPENAI_API_KEY).toBe('sk-env');
    });
  });

  it('generates a secret once outside production and keeps it under DATA_DIR, readable only by its owner', () => {
    const dir = dataDir();
    const first = loadConfig({ DATA_DIR: dir });
    const second = loadConfig({ DATA_DIR: dir });
    expect(first.JWT_SECRET).toBe(second.JWT_SECRET);
    expect(first.JWT_SECRET.length).toBeGreaterThanOrEqual(32);
    expect(readFileSync(join(dir, 'jwt-secret'), 'utf8').trim()).toBe(first.JWT_SECRET);
    expect(statSync(join(dir, 'jwt-secret')).mode & 0o077).toBe(0);
    expect(loadConfig({ DATA_DIR: dataDir() }).JWT_SECRET).not.toBe(first.JWT_SECRET);
  });

  // Found shorter than a secret: another process is writing it (instances started at once on one DATA_DIR,
  // each of which kept a secret of its own and refused the others' tokens), or it was cut short.
  it('reads the secret another process is writing, and replaces one that stays too short', () => {
    const dir = dataDir();
    const file = join(dir, 'jwt-secret');
    writeFileSync(file, '');
    const theirs = 'secret-of-the-process-that-made-the-file-0123456789';
    const writer = spawn('sh', ['-c', `sleep 0.3; printf '%s\\n' "$0" > "$1"`, theirs, file], { stdio: 'ignore' });
    expect(loadConfig({ DATA_DIR: dir }).JWT_SECRET).toBe(theirs);
    writer.unref();

    writeFileSync(file, 'too short\n');
    const replaced = loadConfig({ DATA_DIR: dir }).JWT_SECRET;
    expect(replaced.length).toBeGreaterThanOrEqual(32);
    expect(readFileSync(file, 'utf8').trim()).toBe(replaced);
  });

  it('refuses an AI_CONTEXT_TOKENS that leaves no room for a message besides the reply, in one line', () => {
    const context = (env: Record<string, string>) => () => loadConfig({ DATA_DIR: dataDir(), ...env });
    expect(context({ AI_CONTEXT_TOKENS: '1000' })).toThrow(
      new ConfigError(
        'Invalid configuration: AI_CONTEXT_TOKENS must leave room for a message besides the AI_MAX_OUTPUT_TOKENS (1024) kept for the reply: at least 1032',
      ),
    );
    expect(context({ AI_CONTEXT_TOKENS: '1024' })).toThrow(ConfigError);
    expect(context({ AI_CONTEXT_TOKENS: '4096', AI_MAX_OUTPUT_TOKENS: '4096' })).toThrow(/AI_MAX_OUTPUT_TOKENS \(4096\)/);
    // The smallest that fits: 7 framing tokens and one of text.
    expect(context({ AI_CONTEXT_TOKENS: '1032' })().AI_CONTEXT_TOKENS).toBe(1032);
    expect(context({ AI_CONTEXT_TOKENS: '256', AI_MAX_OUTPUT_TOKENS: '200' })().AI_CONTEXT_TOKENS).toBe(256);
  });

  it('takes http and https provider URLs', () => {
    const config = loadConfig({ DATA_DIR: dataDir(), AI_BASE_URL: 'http://ollama:11434/v1', OPENAI_BASE_URL: 'https://gateway.example.com/v1' });
    expect([config.AI_BASE_URL, config.OPENAI_BASE_URL]).toEqual(['http://ollama:11434/v1', 'https://gateway.example.com/v1']);
  });

  it('has every variable in .env.example, as the README says', () => {
    const example = readFileSync(join(import.meta.dirname, '..', '.env.example'), 'utf8');
    expect(CONFIG_VARIABLES.length).toBeGreaterThan(30);
    expect(CONFIG_VARIABLES.filter((name) => !new RegExp(`^(# )?${name}=`, 'm').test(example))).toEqual([]);
  });

  it('parses durations', () => {
    expect(loadConfig({ DATA_DIR: dataDir(), JWT_EXPIRES_IN: '12h' }).JWT_EXPIRES_IN).toBe(43_200);
    expect(loadConfig({ DATA_DIR: dataDir(), JWT_EXPIRES_IN: '90' }).JWT_EXPIRES_IN).toBe(90);
    expect(loadConfig({ DATA_DIR: dataDir(), JWT_EXPIRES_IN: '30m' }).JWT_EXPIRES_IN).toBe(1800);
    expect(loadConfig({ DATA_DIR: dataDir(), JWT_EXPIRES_IN: '365d' }).JWT_EXPIRES_IN).toBe(365 * 86_400);
  });
});
