import { createServer } from 'node:http';

/** Figure 1's baseline: node:http alone, answering every request with what GET /health/live answers. */
const body = JSON.stringify({ status: 'ok' });
const headers = { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) };

createServer((_req, res) => res.writeHead(200, headers).end(body)).listen(Number(process.env.PORT), '127.0.0.1');
