import { Aborter } from '../aborter.js';
import type { CallBounds } from './types.js';

/**
 * Aborts `target` when any of `sources` aborts, with that source's reason (one already aborted, the
 * first in order, at once); returns what stops following them. Unlike `AbortSignal.any`, nothing
 * combined is created, and once released no source holds a listener that keeps `target` (and whatever
 * listens to it) in memory.
 */
export function followAbort(target: AbortController, ...sources: AbortSignal[]): () => void {
  const listeners = sources.map((source) => [source, () => target.abort(source.reason)] as const);
  for (const [source, abort] of listeners) {
    if (source.aborted) abort();
    else source.addEventListener('abort', abort, { once: true });
  }
  return () => {
    for (const [source, abort] of listeners) source.removeEventListener('abort', abort);
  };
}

/**
 * One controller for a provider call, aborted by whichever comes first of its deadline (`ms` from now,
 * with a `TimeoutError`, as `AbortSignal.timeout` would) and `sources` (with their reasons): what
 * `AbortSignal.any` of a timeout signal and the sources would be, without a combined signal and a timer
 * signal of its own for each call (an open stream would hold both until its end).
 */
export class CallDeadline {
  private readonly controller = new Aborter();
  private readonly timer: NodeJS.Timeout;
  private readonly unfollow: () => void;
  /** Whether the deadline, and not a source, ended the call. */
  timedOut = false;
  /**
   * When the deadline fires as first set (epoch ms), which the signal cannot tell: what a retry's wait is
   * held against (`CallBounds.deadline`). `refresh` moves the timer, not this.
   */
  readonly deadline: number;

  constructor(ms: number, ...sources: AbortSignal[]) {
    this.deadline = Date.now() + ms;
    this.timer = setTimeout(() => {
      if (this.signal.aborted) return; // a source came first: its reason stands
      this.timedOut = true;
      this.controller.abort(new DOMException('The deadline passed', 'TimeoutError'));
    }, ms);
    this.unfollow = followAbort(this.controller, ...sources);
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** The deadline starts again from now (a stream's: each silence between its chunks). */
  refresh(): void {
    this.timer.refresh();
  }

  /** Aborts the call (with an AbortError): its caller gave up on it. */
  abort(): void {
    this.controller.abort();
  }

  /** Stops the timer and following the sources: the call is over. */
  end(): void {
    clearTimeout(this.timer);
    this.unfollow();
  }
}

/**
 * A call's bounds `ms` from now: the signal, and the deadline it fires at, so that a retry told to wait
 * past it (a long Retry-After) gives up at once instead of sleeping until the signal fires. A call that
 * another signal may also end takes a CallDeadline's instead, which lets go of that signal when it ends.
 */
export function within(ms: number): CallBounds {
  return { signal: AbortSignal.timeout(ms), deadline: Date.now() + ms };
}
