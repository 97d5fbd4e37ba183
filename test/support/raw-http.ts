import { type Agent, type IncomingHttpHeaders, request as httpRequest } from 'node:http';
import { connect } from 'node:net';

/**
 * A request's head written by hand on a connection of its own, for what clients send that fetch will not
 * (a body that trickles, one cut short): the socket, to write the body on, what the server has sent so
 * far, and the connection's close. A server that closes with bytes of ours unread resets the connection:
 * a close all the same, not an error of the test's.
 */
export function rawRequest(url: string, method: string, path: string, headers: Record<string, string>) {
  const address = new URL(url);
  const socket = connect(Number(address.port), address.hostname);
  let received = '';
  socket.setEncoding('latin1').on('data', (chunk: string) => (received += chunk));
  socket.on('error', () => {});
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  const lines = Object.entries({ host: 'localhost', ...headers }).map(([name, value]) => `${name}: ${value}\r\n`);
  socket.write(`${method} ${path} HTTP/1.1\r\n${lines.join('')}\r\n`);
  return { socket, received: () => received, closed };
}

/** The status lines of what a connection received: one a response. */
export const statusLines = (received: string) => received.match(/HTTP\/1\.1 \d{3} /g);

/**
 * A request through `agent` (one that keeps connections alive, to see what the server does with them),
 * or on a connection of its own (`false`): its status, headers and body as text.
 */
export function send(
  agent: Agent | false,
  url: string,
  method: string,
  headers: Record<string, string> = {},
  body?: string,
): Promise<{ status: number; headers: IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { agent, method, headers }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}
