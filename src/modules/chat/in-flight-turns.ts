import { Aborter } from '../../aborter.js';
import { RateLimited, ShuttingDown } from '../../http/errors.js';

/**
 * A user at the cap is told to try again in this many seconds. The cap has no window to wait out: a slot
 * frees when one of their chats ends, which most do within seconds (a reply streams for a few). Short,
 * so that a client waits little longer than needed; not shorter, since every try counts against
 * RATE_LIMIT_CHAT (one every 5 s is 12 of its 60 a minute).
 */
const CHAT_SLOT_RETRY_AFTER_SECONDS = 5;

/**
 * The chat turns being answered right now. When the app closes, Fastify waits for requests in flight
 * but knows nothing of a hijacked reply (an SSE stream), and the shutdown bound cuts the sockets of
 * both without a word. Each turn here watches its own interrupt signal instead: once `interruptAll` is
 * called, a stream ends with a final `error` event and a JSON turn answers 503, both naming the stored
 * question.
 *
 * A user may have at most `perUser` turns running at once, in all their projects together. The count is
 * this process's, never shared (through Redis, as the rate limits may be): what it guards is the process's
 * own memory and upstream connections, which another instance's turns do not take.
 */
export class InFlightTurns {
  private readonly running = new Map<Promise<unknown>, Aborter>();
  /** Turns running per user id; a user with none has no entry. */
  private readonly byUser = new Map<string, number>();
  private interrupted = false;

  constructor(private readonly perUser: number) {}

  /**
   * Runs one turn of `userId`, from its first write to its last bookkeeping, with the signal that
   * interrupts it; holds one of the user's slots until it settles, however it ends. Over the cap it
   * rejects with 429 RATE_LIMITED before the turn starts: nothing read or stored, no provider called.
   * A turn that starts after `interruptAll` is interrupted from the start.
   */
  run<T>(userId: string, turn: (interrupt: AbortSignal) => Promise<T>): Promise<T> {
    const held = this.byUser.get(userId) ?? 0;
    if (held >= this.perUser) return Promise.reject(new RateLimited(CHAT_SLOT_RETRY_AFTER_SECONDS, 'Too many chats at once'));
    this.byUser.set(userId, held + 1);
    const controller = new Aborter();
    if (this.interrupted) controller.abort(new ShuttingDown());
    const running = turn(controller.signal).finally(() => {
      this.running.delete(running);
      this.release(userId);
    });
    this.running.set(running, controller);
    return running;
  }

  /** Interrupts every turn, each with its own error (the error will name the turn's own question). */
  interruptAll(): void {
    this.interrupted = true;
    for (const controller of this.running.values()) controller.abort(new ShuttingDown());
  }

  /** Resolves once every turn has finished, however it ended. */
  async settled(): Promise<void> {
    await Promise.allSettled(this.running.keys());
  }

  private release(userId: string): void {
    const left = this.byUser.get(userId)! - 1;
    if (left > 0) this.byUser.set(userId, left);
    else this.byUser.delete(userId);
  }
}
