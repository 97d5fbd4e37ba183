import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { Pool } from 'undici';
import { describe, expect, it } from 'vitest';
import { Aborter } from '../src/aborter.js';
import { withFields } from '../src/with-fields.js';

describe('Aborter', () => {
  it('aborts once, with an AbortError when given no reason, and tells each listener once', () => {
    const aborter = new Aborter();
    let heard = 0;
    aborter.signal.addEventListener('abort', () => heard++);
    expect(aborter.signal.aborted).toBe(false);
    expect(() => aborter.signal.throwIfAborted()).not.toThrow();

    aborter.abort();
    aborter.abort(new Error('later'));
    expect(aborter.signal.aborted).toBe(true);
    expect(aborter.signal.reason).toBeInstanceOf(DOMException);
    expect((aborter.signal.reason as DOMException).name).toBe('AbortError');
    expect(heard).toBe(1);
    expect(() => aborter.signal.throwIfAborted()).toThrow(aborter.signal.reason as DOMException);
  });

  it('calls onabort among the listeners where an AbortSignal does: in the order it was first set', () => {
    const heardBy = (controller: AbortController) => {
      const heard: string[] = [];
      const { signal } = controller;
      signal.addEventListener('abort', () => heard.push('first listener'));
      signal.onabort = () => heard.push('replaced handler');
      signal.addEventListener('abort', () => heard.push('second listener'));
      signal.onabort = function (event) {
        heard.push(`handler: ${event.type}, on its signal: ${this === signal}`);
      };
      controller.abort();
      return heard;
    };
    const heard = heardBy(new Aborter());
    expect(heard).toEqual(heardBy(new AbortController()));
    expect(heard).toEqual(['first listener', 'handler: abort, on its signal: true', 'second listener']);

    const cleared = new Aborter();
    let called = false;
    cleared.signal.onabort = () => (called = true);
    cleared.signal.onabort = null;
    cleared.abort();
    expect(called).toBe(false);
  });

  it('keeps the reason given, and calls no listener removed before', () => {
    const aborter = new Aborter();
    let called = false;
    const listener = () => (called = true);
    aborter.signal.addEventListener('abort', listener);
    aborter.signal.removeEventListener('abort', listener);
    const reason = new Error('deadline');
    aborter.abort(reason);
    expect(aborter.signal.reason).toBe(reason);
    expect(called).toBe(false);
  });

  it('ends what Node and undici were given its signal for, with its reason', async () => {
    const reason = new Error('given up');
    const sleeping = new Aborter();
    const slept = sleep(60_000, undefined, { signal: sleeping.signal });
    sleeping.abort(reason);
    await expect(slept).rejects.toMatchObject({ name: 'AbortError', cause: reason });

    // A server that never answers: only the signal ends the request.
    const server = createServer(() => {});
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const pool = new Pool(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    try {
      const asking = new Aborter();
      const asked = pool.request({ method: 'GET', path: '/', signal: asking.signal });
      setTimeout(() => asking.abort(reason), 50);
      await expect(asked).rejects.toBe(reason);
    } finally {
      await pool.destroy();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  });
});

describe('withFields', () => {
  it('copies its base with the fields added or replaced, and leaves the base as it was', () => {
    const base = { id: 'a', content: 'question' };
    expect(withFields(base, { createdAt: 1, content: 'answer' })).toEqual({ id: 'a', content: 'answer', createdAt: 1 });
    expect(base).toEqual({ id: 'a', content: 'question' });
  });
});
