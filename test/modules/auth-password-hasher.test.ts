import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { type AddressInfo, connect } from 'node:net';
import { getPriority } from 'node:os';
import { Worker } from 'node:worker_threads';
import bcrypt from 'bcrypt';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ClientGone, ShuttingDown } from '../../src/http/errors.js';
import { type PasswordHasherConfig, PasswordHashingBusy, PasswordHasher } from '../../src/modules/auth/password-hasher.js';
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

const postMessage = Worker.prototype.postMessage;

/**
 * The next `times` threads given a job are terminated as soon as it is sent, as a crash, a
 * `process.exit` or running out of memory would end them: Node's Worker is spied on, not the hasher.
 */
function killThreadsMidJob(times: number): void {
  let left = times;
  vi.spyOn(Worker.prototype, 'postMessage').mockImplementation(function (this: Worker, message: unknown) {
    postMessage.call(this, message);
    if (left-- > 0) void this.terminate();
  });
}

afterEach(() => {
  vi.restoreAllMocks();
});

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

  it('gives up a job whose client has gone while it waits, and frees its place in the queue', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 8, PASSWORD_HASH_QUEUE: 1 });
    const gone = new AbortController();
    const running = passwords.hash('first one', gone.signal);
    const waiting = passwords.hash('second one', gone.signal).catch((error: unknown) => error);
    gone.abort();
    expect(await waiting).toBeInstanceOf(ClientGone);
    // Its place is free: one more may wait, where it was refused while the other waited.
    const next = passwords.hash('third one');
    expect(await Promise.all([running, next])).toEqual([expect.stringMatching(/^\$2b\$08\$/), expect.stringMatching(/^\$2b\$08\$/)]);
    expect(await passwords.hash('fourth one', gone.signal).catch((error: unknown) => error)).toBeInstanceOf(ClientGone);
  });

  it('runs a job again on a fresh thread when its thread dies under it', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 10 });
    const hash = await passwords.hash('a password');
    killThreadsMidJob(1);
    expect(await passwords.compare('a password', hash)).toBe(true);
    expect(await passwords.hash('another one')).toMatch(/^\$2b\$10\$/);
    expect(passwords.runningThreads()).toHaveLength(1);
  });

  it('refuses a job whose fresh thread dies too with 503 and Retry-After, and goes on with the next ones', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 10 });
    await passwords.hash('warm up');
    killThreadsMidJob(2);
    const [lost, waiting] = await Promise.allSettled([passwords.hash('lost twice'), passwords.hash('waiting behind it')]);
    expect(lost).toMatchObject({ status: 'rejected', reason: expect.any(PasswordHashingBusy) });
    expect((lost as PromiseRejectedResult).reason).toMatchObject({
      status: 503,
      code: 'SERVICE_UNAVAILABLE',
      headers: { 'retry-after': expect.stringMatching(/^[1-9]\d*$/) },
    });
    expect(waiting).toEqual({ status: 'fulfilled', value: expect.stringMatching(/^\$2b\$10\$/) });
    expect(await passwords.hash('later')).toMatch(/^\$2b\$10\$/);
  });

  it("fails a job that bcrypt itself refuses at once, on the same thread, which goes on", async () => {
    const passwords = start();
    await passwords.hash('warm up');
    const [before] = passwords.runningThreads();
    // Not a thread's fault, so no retry: a caller's mistake that would fail the same way again.
    await expect(passwords.compare('a password', 42 as unknown as string)).rejects.toThrow(/^bcrypt: /);
    expect(await passwords.hash('later')).toMatch(/^\$2b\$04\$/);
    expect(passwords.runningThreads()).toEqual([before]);
  });

  it('tells a hash made at another cost than the configured one', async () => {
    const passwords = start({ BCRYPT_ROUNDS: 5 });
    expect(passwords.needsRehash(await passwords.hash('a password'))).toBe(false);
    expect(passwords.needsRehash(bcrypt.hashSync('a password', 4))).toBe(true);
    expect(passwords.needsRehash(bcrypt.hashSync('a password', 6))).toBe(true);
    expect(passwords.needsRehash(bcrypt.hashSync('a password', 5).replace(/^\$2b/, '$2a'))).toBe(false);
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

  // Clients that send a login and hang up kept their places in the queue, each hash computed for nobody,
  // and everyone else was refused 503 meanwhile.
  it('frees the places of logins whose clients hung up while they waited', async () => {
    t = await startTestApp({ BCRYPT_ROUNDS: '12', PASSWORD_HASH_THREADS: '1', PASSWORD_HASH_QUEUE: '2' });
    const user = await registerUser(t.app);
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    const { port } = t.app.server.address() as AddressInfo;
    const body = JSON.stringify({ email: user.email, password: 'wrong-password' });
    const sockets = Array.from({ length: 3 }, () => {
      const socket = connect(port, '127.0.0.1');
      socket.on('error', () => {});
      socket.write(`POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
      return socket;
    });
    // One compared, two waiting: then their clients go.
    await new Promise((resolve) => setTimeout(resolve, 150));
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect((await login(t, user.email, user.password)).statusCode).toBe(200);
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

  it('answers a login whose hashing thread dies once as usual, and 503 problem+json with Retry-After when twice', async () => {
    t = await startTestApp({ BCRYPT_ROUNDS: '10', PASSWORD_HASH_THREADS: '1' });
    const user = await registerUser(t.app);
    killThreadsMidJob(1);
    expect((await login(t, user.email, user.password)).statusCode).toBe(200);
    killThreadsMidJob(2);
    const refused = await login(t, user.email, user.password);
    expect(expectProblem(refused, 503, 'SERVICE_UNAVAILABLE').detail).not.toMatch(/thread|exit|code/i);
    expect(refused.headers['retry-after']).toMatch(/^[1-9]\d*$/);
    vi.restoreAllMocks();
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
