import { ShuttingDown } from '../../http/errors.js';

/**
 * The chat turns being answered right now. When the app closes, Fastify waits for requests in flight
 * but knows nothing of a hijacked reply (an SSE stream), and the shutdown bound cuts the sockets of
 * both without a word. Each turn here watches its own interrupt signal instead: once `interruptAll` is
 * called, a stream ends with a final `error` event and a JSON turn answers 503, both naming the stored
 * question.
 */
export class InFlightTurns {
  private readonly running = new Map<Promise<unknown>, AbortController>();
  private interrupted = false;

  /**
   * Runs one turn, from its first write to its last bookkeeping, with the signal that interrupts it.
   * A turn that starts after `interruptAll` is interrupted from the start.
   */
  run<T>(turn: (interrupt: AbortSignal) => Promise<T>): Promise<T> {
    const controller = new AbortController();
    if (this.interrupted) controller.abort(new ShuttingDown());
    const running = turn(controller.signal).finally(() => this.running.delete(running));
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
}
