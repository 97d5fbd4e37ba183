import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { getPriority } from 'node:os';
import bcrypt from 'bcrypt';
import { afterEach, describe, expect, it } from 'vitest';
import { ShuttingDown } from '../../src/http/errors.js';
import { type PasswordHasherConfig, PasswordHasher } from '../../src/modules/auth/password-hasher.js';
import { expectProblem, registerUser, startTestApp, type TestApp, uniqueEmail } from '../support/app.js';

const onLinux = process.platform === 'linux';

/** A thread's nice value as the kernel keeps it: field 19 of /proc/<pid>/task/<tid>/stat. */
function niceOf(threadId: number): number {
  const stat = readFileSync(`/proc/self/task/${threadId}/stat`, 'utf8');
  // The command name (field 2) is in parentheses and may hold spaces: count fields after its ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[19 - 3]);
}

/** This process's threads at nice 19: none but password hashing threads lower themselves. */
function lowPriorityThreads(): number[] {
  return readdirSync('/proc/self/task')
    .map(Number)
    .filter((threadId) => {
      try {
        return niceOf(threadId) === 19;
      } catch {
        return false; // ended meanwhile
      }
    });
}

describe('PasswordHasher', () => {
  let hasher: PasswordHasher | undefined;
  const start = (config: Partial<PasswordHasherConfig> = {}) =>
    (hasher = new PasswordHasher({ BCRYPT_ROUNDS: 4, PASSWORD_HASH_THREADS: 1, PASSWORD_HASH_QUEUE: 64, ...config }));
  afterEach(() => hasher?.close());

  it('hashes at the configured cost and compares, interchangeably with bcrypt itself', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 5, PASSWORD_HASH_THREADS: 2 });
    const hash = await passwords.hash('correct horse battery');
    expect(hash).toMatch(/^\$2b\$05\$.{53}$/);
    expect(bcrypt.compareSync('correct horse battery', hash)).toBe(true);
    expect(await passwords.compare('correct horse battery', hash)).toBe(true);
    expect(await passwords.compare('correct horse batterz', hash)).toBe(false);
    // 72 bytes are all significant (longer passwords are refused before they get here).
    const long = 'é'.repeat(36);
    const longHash = await passwords.hash(long);
    expect(await passwords.compare(long, longHash)).toBe(true);
    expect(await passwords.compare('é'.repeat(35) + 'e', longHash)).toBe(false);
    expect(await passwords.compare('anything', bcrypt.hashSync('anything', 4))).toBe(true);
    // Many at once, more than the threads and in any order, each answered with its own result.
    const results = await Promise.all(Array.from({ length: 6 }, (_, i) => passwords.compare(i % 2 ? 'correct horse battery' : 'wrong', hash)));
    expect(results).toEqual([false, true, false, true, false, true]);
  });

  it('refuses a job beyond the queue with 503 SERVICE_UNAVAILABLE and Retry-After', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 8, PASSWORD_HASH_QUEUE: 1 });
    const running = passwords.hash('first one');
    const waiting = passwords.hash('second one');
    const refused = await passwords.hash('third one').catch((error: unknown) => error);
    expect(refused).toMatchObject({ status: 503, code: 'SERVICE_UNAVAILABLE', headers: { 'retry-after': expect.stringMatching(/^[1-9]\d*$/) } });
    expect(await Promise.all([running, waiting])).toEqual([expect.stringMatching(/^\$2b\$08\$/), expect.stringMatching(/^\$2b\$08\$/)]);
    // The queue has room again.
    expect(await passwords.hash('fourth one')).toMatch(/^\$2b\$08\$/);
  });

  it.runIf(onLinux)("runs at nice 19 on its own threads, leaving the event loop's priority alone", async () => {
    const passwords = start({ PASSWORD_HASH_THREADS: 2 });
    const before = getPriority();
    await Promise.all([passwords.hash('a password'), passwords.hash('a password')]);
    const threads = passwords.runningThreads();
    expect(threads).toHaveLength(2);
    for (const { threadId, nice } of threads) {
      expect(threadId).not.toBe(process.pid);
      expect(nice).toBe(19);
      expect(niceOf(threadId!)).toBe(19);
    }
    expect(getPriority()).toBe(before);
    expect(niceOf(process.pid)).toBe(before);
  });

  it('ends its threads on close, refusing what waits and whatever comes later', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 10 });
    await passwords.hash('warm up');
    const threadIds = passwords.runningThreads().map((thread) => thread.threadId);
    const running = passwords.hash('running').catch((error: unknown) => error);
    const waiting = passwords.hash('waiting').catch((error: unknown) => error);
    await passwords.close();
    expect(await waiting).toBeInstanceOf(ShuttingDown);
    expect(await running).toBeInstanceOf(ShuttingDown);
    await expect(passwords.hash('later')).rejects.toBeInstanceOf(ShuttingDown);
    expect(passwords.runningThreads()).toEqual([]);
    if (onLinux) for (const threadId of threadIds) expect(existsSync(`/proc/self/task/${threadId}`)).toBe(false);
  });
});

describe('login through the password hashing threads', () => {
  let t: TestApp | undefined;
  afterEach(async () => {
    await t?.close();
    t = undefined;
  });
  const login = (app: TestApp, email: string, password = 'wrong-password') =>
    app.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email, password } });

  it('answers 503 problem+json with Retry-After beyond the queue, instead of making logins wait', async () => {
    t = await startTestApp({ BCRYPT_ROUNDS: '10', PASSWORD_HASH_THREADS: '1', PASSWORD_HASH_QUEUE: '0' });
    // Unknown emails all wait for the same comparison hash, then ask for their comparisons at once:
    // one thread, no queue, so one is compared and the others are refused.
    const responses = await Promise.all(Array.from({ length: 4 }, () => login(t!, uniqueEmail('nobody'))));
    const statuses = responses.map((response) => response.statusCode).sort();
    expect(statuses).toContain(503);
    expect(statuses).toContain(401);
    expect(statuses.every((status) => status === 401 || status === 503)).toBe(true);
    for (const response of responses.filter((r) => r.statusCode === 503)) {
      expectProblem(response, 503, 'SERVICE_UNAVAILABLE');
      expect(response.headers['retry-after']).toMatch(/^[1-9]\d*$/);
    }
    // Nothing is left waiting: the next login is compared again.
    expectProblem(await login(t, uniqueEmail('nobody')), 401, 'UNAUTHORIZED');
  });

  it('hashes again for unknown emails after a refusal, and still tells nothing apart', async () => {
    t = await startTestApp({ BCRYPT_ROUNDS: '10', PASSWORD_HASH_THREADS: '1', PASSWORD_HASH_QUEUE: '0' });
    const user = await registerUser(t.app);
    // The registration hashes at once; the unknown email's comparison hash would have to wait for it.
    const [registered, refused] = await Promise.all([
      t.app.inject({ method: 'POST', url: '/api/v1/auth/register', payload: { email: uniqueEmail(), password: 'password-1', name: 'A' } }),
      login(t, uniqueEmail('nobody')),
    ]);
    expect(registered.statusCode).toBe(201);
    expect([401, 503]).toContain(refused.statusCode);
    const unknown = expectProblem(await login(t, uniqueEmail('nobody')), 401, 'UNAUTHORIZED');
    const wrong = expectProblem(await login(t, user.email), 401, 'UNAUTHORIZED');
    expect(unknown.detail).toBe(wrong.detail);
    expect((await login(t, user.email, user.password)).statusCode).toBe(200);
  });

  it.runIf(onLinux)('hashes on threads at nice 19, which end when the app closes', async () => {
    const before = new Set(lowPriorityThreads());
    const ownPriority = getPriority();
    const app = await startTestApp({ PASSWORD_HASH_THREADS: '1' });
    const user = await registerUser(app.app);
    expect((await login(app, user.email, user.password)).statusCode).toBe(200);
    const hashing = lowPriorityThreads().filter((threadId) => !before.has(threadId));
    expect(hashing).toHaveLength(1);
    expect(hashing[0]).not.toBe(process.pid);
    expect(getPriority()).toBe(ownPriority);
    await app.close();
    for (const threadId of hashing) expect(existsSync(`/proc/self/task/${threadId}`)).toBe(false);
  });
});
