import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { CallDeadline, followAbort } from '../../src/providers/abort.js';

describe('followAbort', () => {
  it('aborts the target with the reason of the first source that aborts, at once for one already aborted', () => {
    const first = new AbortController();
    const second = new AbortController();
    const target = new AbortController();
    followAbort(target, first.signal, second.signal);
    second.abort(new Error('second'));
    first.abort(new Error('first'));
    expect(target.signal.reason).toEqual(new Error('second'));

    const late = new AbortController();
    followAbort(late, AbortSignal.abort(new Error('already')));
    expect(late.signal.reason).toEqual(new Error('already'));
  });

  it('once released, follows no source', () => {
    const source = new AbortController();
    const target = new AbortController();
    followAbort(target, source.signal)();
    source.abort();
    expect(target.signal.aborted).toBe(false);
  });
});

describe('CallDeadline', () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it('aborts with a TimeoutError when its time passes, and says so', () => {
    const call = new CallDeadline(1_000);
    vi.advanceTimersByTime(999);
    expect(call.signal.aborted).toBe(false);
    vi.advanceTimersByTime(1);
    expect(call.signal.reason).toBeInstanceOf(DOMException);
    expect((call.signal.reason as DOMException).name).toBe('TimeoutError');
    expect(call.timedOut).toBe(true);
  });

  it('aborts with a source’s reason when the source comes first, which is not the deadline', () => {
    const interrupt = new AbortController();
    const call = new CallDeadline(1_000, new AbortController().signal, interrupt.signal);
    interrupt.abort(new Error('shutting down'));
    vi.advanceTimersByTime(1_000);
    expect(call.signal.reason).toEqual(new Error('shutting down'));
    expect(call.timedOut).toBe(false);
  });

  it('starts its wait again when refreshed', () => {
    const call = new CallDeadline(1_000);
    vi.advanceTimersByTime(800);
    call.refresh();
    vi.advanceTimersByTime(800);
    expect(call.signal.aborted).toBe(false);
    vi.advanceTimersByTime(200);
    expect(call.timedOut).toBe(true);
  });

  it('once ended, is aborted neither by its time nor by its sources', () => {
    const source = new AbortController();
    const call = new CallDeadline(1_000, source.signal);
    call.end();
    source.abort();
    vi.advanceTimersByTime(2_000);
    expect(call.signal.aborted).toBe(false);
    expect(vi.getTimerCount()).toBe(0);
  });

  it('aborts with an AbortError when its caller gives up', () => {
    const call = new CallDeadline(1_000);
    call.abort();
    expect((call.signal.reason as DOMException).name).toBe('AbortError');
    expect(call.timedOut).toBe(false);
  });
});
