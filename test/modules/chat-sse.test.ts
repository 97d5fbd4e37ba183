import { once } from 'node:events';
import http, { type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { EventStream } from '../../src/modules/chat/sse.js';
import { parseSse } from '../support/sse.js';

/**
 * A real server on loopback whose one response is written by `write`; resolves with what the client
 * received and how many times the server's socket handed bytes to the system (its `_write` and
 * `_writev`, what a corked socket defers to one call).
 */
async function serve(write: (events: EventStream) => Promise<void>): Promise<{ status: number; type: string; body: string; flushes: number }> {
  let flushes = 0;
  const server = http.createServer((_request, response: ServerResponse) => {
    type Flush = (this: unknown, ...args: unknown[]) => void;
    const socket = response.socket as unknown as Record<'_write' | '_writev', Flush>;
    for (const method of ['_write', '_writev'] as const) {
      const original = socket[method];
      socket[method] = function (...args) {
        flushes++;
        original.apply(this, args);
      };
    }
    const events = new EventStream(response, 60_000, 60_000);
    events.open({ 'x-request-id': 'r1' });
    // As the service writes: in a continuation after an await (of the database, the provider).
    void nextTurn()
      .then(() => write(events))
      .then(() => events.end());
  });
  servers.push(server);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  const response = await fetch(`http://127.0.0.1:${port}/`);
  const body = await response.text();
  return { status: response.status, type: response.headers.get('content-type') ?? '', body, flushes };
}

const servers: http.Server[] = [];
afterEach(() => {
  for (const server of servers.splice(0)) server.close();
});

describe('EventStream', () => {
  it('sends the headers with the first event, and the events written in one run of continuations in one write', async () => {
    const { status, type, body, flushes } = await serve(async (events) => {
      await events.send('user_message', { n: 1 });
      await events.send('delta', { content: 'a' });
      await nextTurn();
      await events.send('delta', { content: 'b' });
    });
    expect(status).toBe(200);
    expect(type).toBe('text/event-stream; charset=utf-8');
    expect(parseSse(body).events).toEqual([
      { id: '1', event: 'user_message', data: { n: 1 } },
      { id: '2', event: 'delta', data: { content: 'a' } },
      { id: '3', event: 'delta', data: { content: 'b' } },
    ]);
    // The headers, user_message and the first delta; then the second delta with the end of the stream.
    expect(flushes).toBe(2);
  });

  it('does not hold an event back for a later one', async () => {
    const { body, flushes } = await serve(async (events) => {
      for (const content of ['a', 'b', 'c']) {
        await events.send('delta', { content });
        await nextTurn();
      }
    });
    expect(parseSse(body).events.map((event) => event.data.content)).toEqual(['a', 'b', 'c']);
    // One write per event, and one for the end of the stream.
    expect(flushes).toBe(4);
  });

  it('answers an event the client can take at once without a promise, and one it has yet to take with a promise', async () => {
    const answers: string[] = [];
    await serve(async (events) => {
      const answer = (sent: Promise<void> | undefined) => answers.push(sent ? 'promise' : 'none');
      answer(events.send('delta', { content: 'a' }));
      // Over the response's buffer: the client has yet to take it.
      const waiting = events.send('delta', { content: 'x'.repeat(64 * 1024) });
      answer(waiting);
      await waiting;
    });
    expect(answers).toEqual(['none', 'promise']);
  });

  it('leaves no listener on the response for each event it waited to write', async () => {
    const listeners = { before: 0, after: 0 };
    const { body } = await serve(async (events) => {
      const raw = (events as unknown as { raw: ServerResponse }).raw;
      listeners.before = raw.listenerCount('close') + raw.listenerCount('error');
      // Each event is over the response's buffer, so each send waits for the client to take it.
      for (let i = 0; i < 30; i++) await events.send('delta', { content: 'x'.repeat(64 * 1024) });
      listeners.after = raw.listenerCount('close') + raw.listenerCount('error');
    });
    expect(parseSse(body).events).toHaveLength(30);
    expect(listeners.after).toBe(listeners.before);
  });

  it('cuts off a client that reads nothing for stallMs while an event waits, says so, and does not wait on it any longer', async () => {
    const stallMs = 300;
    let sent = 0;
    let toldStalled = 0;
    let cutOffAfterMs = -1;
    const done = new Promise<void>((resolve) => {
      const server = http.createServer((_request, response) => {
        const events = new EventStream(response, 60_000, stallMs, undefined, () => toldStalled++);
        events.open({});
        void (async () => {
          let waitedSince = 0;
          // More than the sockets on both sides hold: a send ends up waiting for a client that reads nothing.
          while (!events.closed) {
            waitedSince = Date.now();
            await events.send('delta', { content: 'x'.repeat(256 * 1024) });
            sent++;
          }
          cutOffAfterMs = Date.now() - waitedSince;
          resolve();
        })();
      });
      servers.push(server);
      server.listen(0, '127.0.0.1');
    });
    const server = servers.at(-1)!;
    if (!server.listening) await once(server, 'listening');
    const { port } = server.address() as AddressInfo;
    const client = http.get(`http://127.0.0.1:${port}/`, (response) => response.pause());
    client.on('error', () => undefined);

    await done;
    client.destroy();
    expect(sent).toBeGreaterThan(0);
    expect(cutOffAfterMs).toBeGreaterThanOrEqual(stallMs - 20);
    expect(toldStalled).toBe(1);
  });
});
