import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { ANSWER_AT_ONCE, UPSTREAM_REPLY, type UpstreamBehaviour } from './workload.js';

/**
 * The benchmarks' OpenAI-compatible upstream, run as its own process (PORT) so that its work stays off
 * the event loops being measured. test/support/fake-upstream.ts is built for scripting faults and
 * inspecting requests: it keeps every request it receives and reads multipart bodies. This one keeps
 * nothing per request and does as little as an upstream can: one behaviour at a time, set by the
 * harness (`PUT /__behaviour`), and the body of the last chat request (`GET /__last-chat`), so that the
 * harness can send the very same body to it directly.
 */

let behaviour: UpstreamBehaviour = ANSWER_AT_ONCE;
let lastChat = '{}';
let nextId = 1;
const replyWords = UPSTREAM_REPLY.split(' ');

const server = createServer((req, res) => {
  readBody(req)
    .then((body) => route(req, res, body))
    .catch(() => res.destroy());
});
server.keepAliveTimeout = 120_000;
server.listen(Number(process.env.PORT), '127.0.0.1');

async function route(req: IncomingMessage, res: ServerResponse, body: string): Promise<void> {
  if (req.method === 'POST' && req.url === '/v1/chat/completions') {
    lastChat = body;
    return chat(res, JSON.parse(body) as ChatRequest);
  }
  if (req.method === 'PUT' && req.url === '/__behaviour') {
    behaviour = JSON.parse(body) as UpstreamBehaviour;
    return void res.writeHead(204).end();
  }
  if (req.method === 'GET' && req.url === '/__last-chat') return send(res, 'application/json', lastChat);
  if (req.method === 'GET' && req.url === '/health/live') return send(res, 'application/json', '{"status":"ok"}');
  res.writeHead(404).end();
}

interface ChatRequest {
  model: string;
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
}

async function chat(res: ServerResponse, request: ChatRequest): Promise<void> {
  const { delayMs, chunks, chunkGapMs } = behaviour;
  if (delayMs) await sleep(delayMs);
  const id = `chatcmpl-bench${nextId++}`;
  const created = Math.floor(Date.now() / 1000);
  const usage = { prompt_tokens: 10, completion_tokens: chunks, total_tokens: 10 + chunks };
  if (!request.stream) {
    const message = { role: 'assistant', content: UPSTREAM_REPLY };
    const completion = { id, object: 'chat.completion', created, model: request.model, choices: [{ index: 0, message, finish_reason: 'stop' }], usage };
    return send(res, 'application/json', JSON.stringify(completion));
  }

  const head = `{"id":"${id}","object":"chat.completion.chunk","created":${created},"model":${JSON.stringify(request.model)},"choices":[`;
  const event = (choices: string) => `data: ${head}${choices}]}\n\n`;
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  res.write(event('{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}'));
  for (let i = 0; i < chunks; i++) {
    if (i > 0 && chunkGapMs) await sleep(chunkGapMs);
    if (res.destroyed) return; // the client went away
    const word = replyWords[i % replyWords.length]! + ' ';
    res.write(event(`{"index":0,"delta":{"content":${JSON.stringify(word)}},"finish_reason":null}`));
  }
  res.write(event('{"index":0,"delta":{},"finish_reason":"stop"}'));
  if (request.stream_options?.include_usage) res.write(`data: ${head}],"usage":${JSON.stringify(usage)}}\n\n`);
  res.end('data: [DONE]\n\n');
}

function send(res: ServerResponse, contentType: string, body: string): void {
  res.writeHead(200, { 'content-type': contentType, 'content-length': Buffer.byteLength(body) }).end(body);
}

async function readBody(req: IncomingMessage): Promise<string> {
  let body = '';
  req.setEncoding('utf8');
  for await (const part of req) body += part as string;
  return body;
}
