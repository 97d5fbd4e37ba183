/**
 * An AbortController whose signal is cheap to make, for those made with every chat turn (its interrupt,
 * its provider call's deadline, a stream's client). Node 20 makes each AbortSignal by swapping an
 * EventTarget's prototype (Node 22 no longer does), and V8 11 answers that with hidden classes of the
 * signal's own: 6 µs and about a kilobyte of old generation for every signal (its maps, their
 * descriptors, the inline-cache handlers that meet them), which only a full collection takes back. This
 * signal is an EventTarget of an ordinary class (0.4 µs, nothing kept), and an AbortSignal to whatever
 * takes one by its shape: undici, `timers/promises`, Node's streams and `events`. Not to
 * `AbortSignal.any`, which passes an abort on only from Node's own signals: one combined from this
 * signal would never abort.
 */
export class Aborter implements AbortController {
  readonly signal = new PlainAbortSignal();

  abort(reason?: unknown): void {
    this.signal[abort](reason);
  }
}

const abort = Symbol('abort');

type AbortHandler = ((this: AbortSignal, event: Event) => unknown) | null;

class PlainAbortSignal extends EventTarget implements AbortSignal {
  #aborted = false;
  #reason: unknown = undefined;
  #onabort: AbortHandler = null;

  /** An event handler, as the DOM's: called among the listeners in the order it was first set; null removes it. */
  get onabort(): AbortHandler {
    return this.#onabort;
  }

  set onabort(handler: AbortHandler) {
    if (handler && !this.#onabort) this.addEventListener('abort', callOnabort);
    else if (!handler && this.#onabort) this.removeEventListener('abort', callOnabort);
    this.#onabort = handler;
  }

  get aborted(): boolean {
    return this.#aborted;
  }

  get reason(): unknown {
    return this.#reason;
  }

  throwIfAborted(): void {
    if (this.#aborted) throw this.#reason;
  }

  /** As an AbortSignal's: once only, with an AbortError when no reason is given. */
  [abort](reason: unknown = new DOMException('This operation was aborted', 'AbortError')): void {
    if (this.#aborted) return;
    this.#aborted = true;
    this.#reason = reason;
    this.dispatchEvent(new Event('abort'));
  }
}

/** The listener of a signal's `onabort`: one for all signals, called with the signal as `this`, as EventTarget calls its listeners. */
function callOnabort(this: PlainAbortSignal, event: Event): void {
  this.onabort?.call(this, event);
}
