/**
 * An AbortController whose signal is cheap to make, for those made with every chat turn (its interrupt,
 * its provider call's deadline, a stream's client). Node 20 makes each AbortSignal by swapping an
 * EventTarget's prototype (Node 22 no longer does), and V8 11 answers that with hidden classes of the
 * signal's own: 6 µs and about a kilobyte of old generation for every signal (its maps, their
 * descriptors, the inline-cache handlers that meet them), which only a full collection takes back. This
 * signal is an EventTarget of an ordinary class (0.4 µs, nothing kept), and an AbortSignal to whatever
 * takes one: undici, `timers/promises` and Node's streams look at a signal's shape, not its class.
 */
export class Aborter implements AbortController {
  readonly signal = new PlainAbortSignal();

  abort(reason?: unknown): void {
    this.signal[abort](reason);
  }
}

const abort = Symbol('abort');

class PlainAbortSignal extends EventTarget implements AbortSignal {
  #aborted = false;
  #reason: unknown = undefined;
  onabort: ((this: AbortSignal, event: Event) => unknown) | null = null;

  get aborted(): boolean {
    return this.#aborted;
  }

  get reason(): unknown {
    return this.#reason;
  }

  throwIfAborted(): void {
    if (this.#aborted) throw this.#reason;
  }

  /** As an AbortSignal's: once only, with an AbortError when no reason is given, `onabort` called first. */
  [abort](reason: unknown = new DOMException('This operation was aborted', 'AbortError')): void {
    if (this.#aborted) return;
    this.#aborted = true;
    this.#reason = reason;
    const event = new Event('abort');
    this.onabort?.call(this, event);
    this.dispatchEvent(event);
  }
}
