import { Worker } from 'node:worker_threads';
import type { Config } from '../../config.js';
import { ApiError, ClientGone, retryAfterSeconds, ShuttingDown } from '../../http/errors.js';
import { MAX_PASSWORD_BYTES, MIN_PASSWORD_BYTES, normalizePassword } from './schemas.js';

/** The bcrypt cost of new hashes, how many threads hash at once, how many jobs may wait for one. */
export type PasswordHasherConfig = Pick<Config, 'BCRYPT_ROUNDS' | 'PASSWORD_HASH_THREADS' | 'PASSWORD_HASH_QUEUE'>;

/** What a thread reports once it runs: its OS thread id and nice value, on Linux. */
export interface HashThreadInfo {
  threadId?: number;
  nice?: number;
}

type Operation = { op: 'hash'; password: string; rounds: number } | { op: 'compare'; password: string; hash: string };

interface Job {
  operation: Operation;
  resolve(result: unknown): void;
  reject(error: Error): void;
  startedAt?: number;
  /** Whether a thread already died running it: once is a fluke (a crash, a kill), twice is not. */
  retried?: boolean;
}

interface HashThread {
  worker: Worker;
  info?: HashThreadInfo;
  job?: Job;
}

type ThreadMessage = { ready: HashThreadInfo } | { result: unknown } | { error: string };

/**
 * 503 when too many hashes wait already: the client comes back later instead of waiting without bound.
 * Also when a job's thread died twice under it (`cause` says how, for the log): a fault of the server, not
 * of the request, that the fresh threads replacing them may well not repeat.
 */
export class PasswordHashingBusy extends ApiError {
  constructor(waitSeconds: number, detail = 'Too many passwords to check at once', cause?: Error) {
    const seconds = retryAfterSeconds(waitSeconds);
    super(503, 'SERVICE_UNAVAILABLE', `${detail}; retry in ${seconds} s`, {}, { 'retry-after': String(seconds) });
    if (cause) this.cause = cause;
  }
}

const WORKER_FILE = new URL('./password-hasher-worker.mjs', import.meta.url);

/** Before a first job has finished, how long one is taken to last (cost 12 on a current core). */
const FIRST_GUESS_MS = 250;

/** Retry-After of a job whose thread died twice: long enough for what killed them (memory) to ease. */
const LOST_RETRY_AFTER_S = 5;

/** The cost of a bcrypt hash, from its `$2b$12$` prefix (any of bcrypt's versions). */
const COST = /^\$2[abxy]?\$(\d{2})\$/;

/**
 * bcrypt off the event loop's CPU time: a small pool of worker threads, each running bcrypt's
 * synchronous API at the lowest scheduling priority (password-hasher-worker.mjs). bcrypt's async
 * API would hash on libuv's pool, whose threads compete with the event loop at equal priority, so a
 * burst of logins slows every other request; at nice 19 hashing gets only the CPU time the event loop
 * leaves. Jobs beyond the threads wait in a bounded queue; past it the caller gets PasswordHashingBusy.
 * Threads start with the first job that needs them, are unref'd while idle so that they never keep
 * the process alive, and end with close().
 */
export class PasswordHasher {
  private readonly threads: HashThread[] = [];
  private readonly queue: Job[] = [];
  private averageJobMs = FIRST_GUESS_MS;
  private closed = false;

  constructor(private readonly config: PasswordHasherConfig) {}

  /**
   * A hash of the password in its composed form (`normalizePassword`). With `clientGone` (its client's,
   * see `clientGoneSignal`), one still waiting for a thread when it aborts is given up (ClientGone).
   */
  hash(password: string, clientGone?: AbortSignal): Promise<string> {
    return this.run({ op: 'hash', password: normalizePassword(password), rounds: this.config.BCRYPT_ROUNDS }, clientGone) as Promise<string>;
  }

  /**
   * Whether `password`, in its composed form, is the one `hash` was made of; failing that, when it was
   * sent otherwise, whether it is as sent (hashes made before passwords were composed are of the
   * password as it was sent then). A second comparison whatever the email, known or not. `clientGone`
   * as for `hash`.
   */
  async compare(password: string, hash: string, clientGone?: AbortSignal): Promise<boolean> {
    const composed = normalizePassword(password);
    if (await this.matches(composed, hash, clientGone)) return true;
    return composed !== password && this.matches(password, hash, clientGone);
  }

  /**
   * Only a password that could have been set matches, though bcrypt would match others: one longer than
   * it reads (it would match on the first 72 bytes), and one with a NUL or under 8 bytes (it reads up to
   * the first NUL, so that `abcd\0abcd`, accepted before NUL was refused, hashed as `abcd`, and `abcd` or
   * an empty password would have matched it), and one with a lone surrogate (hashed as U+FFFD, it would
   * match a password set with U+FFFD there, which one of them never is). Each takes a comparison's time
   * all the same, as a wrong password does.
   */
  private async matches(password: string, hash: string, clientGone?: AbortSignal): Promise<boolean> {
    const matches = (await this.run({ op: 'compare', password, hash }, clientGone)) as boolean;
    const bytes = Buffer.byteLength(password, 'utf8');
    return matches && bytes >= MIN_PASSWORD_BYTES && bytes <= MAX_PASSWORD_BYTES && !password.includes('\0') && !/\p{Surrogate}/u.test(password);
  }

  /**
   * Whether a hash was made at another cost than the configured one, so that a password just verified
   * against it should be hashed again: comparing against it takes another time than against the hash
   * of an unknown email (always at the configured cost), which would tell that the email exists.
   */
  needsRehash(hash: string): boolean {
    return Number(COST.exec(hash)?.[1]) !== this.config.BCRYPT_ROUNDS;
  }

  /** Whether a hash was made at a lower cost than the configured one: compared against in less time. */
  cheaperThanConfigured(hash: string): boolean {
    return Number(COST.exec(hash)?.[1]) < this.config.BCRYPT_ROUNDS;
  }

  /** The running threads as they reported themselves (for tests and diagnostics). */
  runningThreads(): HashThreadInfo[] {
    return this.threads.flatMap((thread) => (thread.info ? [thread.info] : []));
  }

  /** Refuses what waits and what runs with 503, and ends every thread. */
  async close(): Promise<void> {
    this.closed = true;
    for (const job of this.queue.splice(0)) job.reject(new ShuttingDown());
    const threads = this.threads.splice(0);
    for (const thread of threads) thread.job?.reject(new ShuttingDown());
    await Promise.all(threads.map((thread) => thread.worker.terminate()));
  }

  private run(operation: Operation, clientGone?: AbortSignal): Promise<unknown> {
    if (this.closed) return Promise.reject(new ShuttingDown());
    if (clientGone?.aborted) return Promise.reject(new ClientGone());
    const idle = this.idleThread();
    if (!idle && this.queue.length >= this.config.PASSWORD_HASH_QUEUE) {
      // Everything ahead of it, spread over the threads: roughly when a new one would start.
      const aheadMs = ((this.queue.length + this.threads.length) * this.averageJobMs) / this.threads.length;
      return Promise.reject(new PasswordHashingBusy(aheadMs / 1000));
    }
    return new Promise((resolve, reject) => {
      const job: Job = { operation, resolve, reject };
      if (idle) return this.give(idle, job);
      this.queue.push(job);
      // Its client gone while it waits: nobody would hear the answer, and its place is another's. Clients
      // that send and hang up kept the queue full (everyone else 503), a hash computed for each.
      clientGone?.addEventListener(
        'abort',
        () => {
          const waiting = this.queue.indexOf(job);
          if (waiting === -1) return; // running, or done: its answer is dropped by its caller
          this.queue.splice(waiting, 1);
          reject(new ClientGone());
        },
        { once: true },
      );
    });
  }

  /** A thread without a job, started if the pool is not full yet. */
  private idleThread(): HashThread | undefined {
    const idle = this.threads.find((thread) => !thread.job);
    if (idle || this.threads.length >= this.config.PASSWORD_HASH_THREADS) return idle;
    return this.startThread();
  }

  private startThread(): HashThread {
    // No execArgv: the thread runs plain JavaScript and needs neither tsx's loader (dev, tests) nor the
    // service's own flags (the bench's --cpu-prof would profile every thread).
    const thread: HashThread = { worker: new Worker(WORKER_FILE, { execArgv: [] }) };
    thread.worker.on('message', (message: ThreadMessage) => {
      if ('ready' in message) thread.info = message.ready;
      else this.finish(thread, message);
    });
    // A thread that failed or ended on its own is replaced by the next job that needs one. Its job runs
    // again first, on a fresh thread: the caller is not to blame for the thread (a 500 would say it is).
    const lost = (error: Error) => {
      const index = this.threads.indexOf(thread);
      if (index === -1) return; // closed, or lost already ('exit' follows 'error')
      this.threads.splice(index, 1);
      const job = thread.job;
      if (job?.retried) job.reject(new PasswordHashingBusy(LOST_RETRY_AFTER_S, 'Passwords cannot be checked at the moment', error));
      else if (job) {
        job.retried = true;
        this.queue.unshift(job);
      }
      this.dispatch();
    };
    thread.worker.on('error', lost);
    thread.worker.on('exit', (code) => lost(new Error(`password hashing thread exited with code ${code}`)));
    thread.worker.unref();
    this.threads.push(thread);
    return thread;
  }

  private give(thread: HashThread, job: Job): void {
    thread.job = job;
    job.startedAt = performance.now();
    // Kept alive while it works: the caller is waiting for the answer.
    thread.worker.ref();
    thread.worker.postMessage(job.operation);
  }

  private finish(thread: HashThread, message: { result: unknown } | { error: string }): void {
    const job = thread.job;
    if (!job) return;
    thread.job = undefined;
    thread.worker.unref();
    this.averageJobMs = 0.8 * this.averageJobMs + 0.2 * (performance.now() - job.startedAt!);
    if ('error' in message) job.reject(new Error(`bcrypt: ${message.error}`));
    else job.resolve(message.result);
    this.dispatch();
  }

  /** Hands the oldest waiting job to an idle thread, starting one if the pool is not full. */
  private dispatch(): void {
    if (this.closed || this.queue.length === 0) return;
    const idle = this.idleThread();
    if (idle) this.give(idle, this.queue.shift()!);
  }
}
