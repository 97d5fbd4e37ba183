import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * A real OpenAI-compatible server on 127.0.0.1 for tests: chat completions (JSON and SSE) and the Files
 * API, scripted per request. Each request takes the next enqueued reply, else the default one (an echo).
 *
 *   const fake = await FakeUpstream.start();            // AI_BASE_URL: fake.url
 *   fake.enqueue({ status: 429, retryAfter: 1 }, { status: 500 }, { content: 'ok' });
 *   fake.enqueue({ chunks: 5, chunkDelayMs: 200 });     // slow chunks
 *   fake.enqueue({ fault: 'hang' });                    // until the client goes away
 *   fake.enqueue({ status: 307, headers: { location } }); // a redirect
 *   await fake.waitForClientClose();                    // ...which it then did
 *   fake.requests[0].body                               // what the upstream received
 */

/** Text every upstream error carries, so tests can check that it never reaches a client. */
export const UPSTREAM_ERROR_TEXT = 'upstream detail: key sk-upstream-LEAK-0000 of org-LEAK is over quota';

export type UpstreamFault =
  /** Accept the request and never answer, until the client goes away (any endpoint). */
  | 'hang'
  /** Destroy the socket: before any byte, or when streaming after `afterChunks` content chunks. */
  | 'reset'
  /** JSON: a 200 whose connection is destroyed half-way through its body, after the headers. */
  | 'reset-mid-body'
  /** JSON: a 200 application/json body cut off mid-way. Streaming: a `data:` line that is not JSON. */
  | 'malformed-json'
  /** JSON: a 200 completion without `choices`. Streaming: chunks with empty `choices`, never a finish_reason. */
  | 'no-choices'
  /** JSON: a 200 `{error}` body. Streaming: an `{error}` event after `afterChunks` content chunks. */
  | 'error-body'
  /** Streaming: stop after `afterChunks` content chunks, leaving the connection open. */
  | 'stall'
  /** Streaming: end the response cleanly after `afterChunks` content chunks, without finish_reason or [DONE]. */
  | 'end-early'
  /** Streaming: the whole answer and [DONE], then the response left open (a proxy that does not end it). */
  | 'open-after-done'
  /** Streaming: the whole answer (finish_reason, usage), then no [DONE] and the response left open. */
  | 'open-after-finish'
  /**
   * JSON: a 200 text/html page. Streaming: after `afterChunks` content chunks, GARBAGE_LINES (no event a
   * parser may act on, though some carry UPSTREAM_ERROR_TEXT), then the rest as usual.
   */
  | 'garbage'
  /**
   * Bytes that keep coming too slowly to make an answer: one byte at a time, each `chunkDelayMs` (default
   * 100) after the one before. JSON: the whole body. Streaming: from the `afterChunks`-th content chunk on.
   */
  | 'drip';

/** What the fake does with one request. Every field is optional: `{}` is the default echo. */
export interface UpstreamReply {
  /**
   * A status of 400 or more answers an OpenAI-style error body carrying UPSTREAM_ERROR_TEXT; one from 300
   * to 399 answers with no body (a redirect: give its `location` in `headers`).
   */
  status?: number;
  /** The Retry-After header: seconds, or a string as given (an HTTP date). */
  retryAfter?: number | string;
  /** With `status`: the error body's `code` and `type`, as OpenAI names its refusals (e.g. `insufficient_quota`). */
  errorCode?: string;
  /**
   * The error as sent, in place of OpenAI's shape (another server's: vLLM's, llama.cpp's, OpenRouter's):
   * with `status`, the answer's body; with `fault: 'error-body'`, the 200's body or the stream's chunk.
   */
  errorBody?: unknown;
  /** More response headers, on any answer (e.g. `retry-after-ms`). */
  headers?: Record<string, string>;
  /** The reply text; by default `Echo: ` and the last user message. */
  content?: string;
  /** The model declines, as OpenAI's do: this text as `refusal` in place of content (JSON: content null; streaming: `delta.refusal` chunks). */
  refusal?: string;
  /** The model the reply names; by default the requested one. */
  model?: string;
  /** Why the reply ends (`length`: at the output limit); by default `stop`. Streaming: on the chunk after the content. */
  finishReason?: string;
  /** The usage reported; false sends none, even when the client asked for it. By default words counted. */
  usage?: false | { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  /** A wait before anything is answered. */
  delayMs?: number;
  /** Streaming: the content split into this many chunks; by default one per word. */
  chunks?: number;
  /** Streaming: a pause before every content chunk but the first; with `fault: 'drip'`, before every byte. */
  chunkDelayMs?: number;
  /** Streaming: this many chunks of thinking (`reasoning_content`, as vLLM sends DeepSeek-R1's) before the content, each after `chunkDelayMs`. */
  thinking?: number;
  fault?: UpstreamFault;
  /** Streaming faults strike after this many content chunks (default 1). */
  afterChunks?: number;
  /**
   * Refuse what OpenAI's own API refuses: `max_tokens` for its reasoning models (o1, o3, o4-mini, gpt-5…),
   * and a file part naming a file it does not hold (never uploaded, or deleted).
   */
  asOpenAI?: boolean;
}

export interface UpstreamRequest {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  /** Parsed JSON; for a file upload its form fields: `{ purpose, filename, mimeType, size }`. */
  body: Record<string, unknown>;
  /** Date.now() when the request had fully arrived. */
  receivedAt: number;
  /** Content chunks written so far (streaming). */
  chunksSent: number;
  /** The fake finished its answer. */
  answered: boolean;
  /** The client closed the connection before the answer was finished. */
  clientClosed: boolean;
  /** The client's port: the same for the requests of one kept-alive connection. */
  clientPort: number | undefined;
}

export interface StoredFile {
  filename: string;
  mimeType: string;
  purpose: string;
  bytes: Buffer;
}

interface Exchange {
  record: UpstreamRequest;
  reply: UpstreamReply;
  res: ServerResponse;
  /** The file of an upload. */
  upload?: File;
  /** Aborted when the connection closes, so that no timer of the fake outlives it. */
  gone: AbortSignal;
  /** Destroys the socket, which the client sees as a reset (and the record not as a client close). */
  resetSocket(): void;
}

const WAIT_POLL_MS = 5;

export class FakeUpstream {
  readonly requests: UpstreamRequest[] = [];
  /** Files uploaded and not deleted, by id. */
  readonly files = new Map<string, StoredFile>();
  private queue: UpstreamReply[] = [];
  private fallback: UpstreamReply = {};
  private nextId = 1;

  private constructor(
    private readonly server: Server,
    /** Base URL including `/v1`, as AI_BASE_URL or an adapter's baseURL. */
    readonly url: string,
  ) {}

  static async start(): Promise<FakeUpstream> {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as AddressInfo;
    const fake = new FakeUpstream(server, `http://127.0.0.1:${port}/v1`);
    server.on('request', (req, res) => void fake.handle(req, res));
    return fake;
  }

  /** Replies for the next requests, in order, whatever their endpoint; then the default again. */
  enqueue(...replies: UpstreamReply[]): void {
    this.queue.push(...replies);
  }

  /** The reply for every request once the queue is empty (e.g. `{ status: 500 }` for "always down"). */
  setDefault(reply: UpstreamReply): void {
    this.fallback = reply;
  }

  /** Forgets requests, queue, default and files; for a beforeEach. */
  reset(): void {
    this.requests.length = 0;
    this.queue = [];
    this.fallback = {};
    this.files.clear();
  }

  /** Resolves with the `count`-th request (1-based) once it has arrived. */
  async waitForRequests(count: number, timeoutMs = 5_000): Promise<UpstreamRequest> {
    await this.waitUntil(() => this.requests.length >= count, `${count} request(s)`, timeoutMs);
    return this.requests[count - 1]!;
  }

  /** Resolves once the client has closed the connection of `request` (by default the last) before its answer ended. */
  async waitForClientClose(request?: UpstreamRequest, timeoutMs = 5_000): Promise<void> {
    if (!request) await this.waitForRequests(1, timeoutMs);
    const target = request ?? this.requests.at(-1)!;
    await this.waitUntil(() => target.clientClosed, `the client to close ${target.method} ${target.path}`, timeoutMs);
  }

  /** Resolves once no client holds a connection open to the fake (an idle keep-alive socket included). */
  async waitForNoConnections(timeoutMs = 5_000): Promise<void> {
    let open = -1;
    const count = () => this.server.getConnections((_, connections) => (open = connections));
    count();
    await this.waitUntil(() => {
      if (open !== 0) count();
      return open === 0;
    }, 'connections closed', timeoutMs);
  }

  async close(): Promise<void> {
    this.server.closeAllConnections(); // hanging answers and idle keep-alive sockets
    await new Promise<void>((resolve, reject) => this.server.close((error) => (error ? reject(error) : resolve())));
  }

  private async waitUntil(done: () => boolean, what: string, timeoutMs: number): Promise<void> {
    const giveUpAt = Date.now() + timeoutMs;
    while (!done()) {
      if (Date.now() >= giveUpAt) throw new Error(`fake upstream: no ${what} within ${timeoutMs} ms`);
      await sleep(WAIT_POLL_MS);
    }
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const closed = new AbortController();
    let resetByFake = false;
    const record: UpstreamRequest = {
      method: req.method ?? 'GET',
      path: new URL(req.url ?? '/', 'http://fake').pathname,
      headers: req.headers,
      body: {},
      receivedAt: 0,
      chunksSent: 0,
      answered: false,
      clientClosed: false,
      clientPort: req.socket.remotePort,
    };
    res.on('finish', () => (record.answered = true));
    res.on('close', () => {
      if (!record.answered && !resetByFake) record.clientClosed = true;
      closed.abort();
    });
    const reply = this.queue.shift() ?? this.fallback;
    const exchange: Exchange = {
      record,
      reply,
      res,
      gone: closed.signal,
      resetSocket() {
        resetByFake = true;
        req.socket.destroy();
      },
    };
    try {
      const { body, upload } = await parseBody(req, await readBody(req));
      record.body = body;
      record.receivedAt = Date.now();
      exchange.upload = upload;
      this.requests.push(record);
      if (reply.delayMs) await sleep(reply.delayMs, undefined, { signal: closed.signal });
      await this.answer(exchange);
    } catch (error) {
      // The client went away during a wait: nothing left to answer.
      if (closed.signal.aborted) return;
      throw error;
    }
  }

  private async answer(exchange: Exchange): Promise<void> {
    const { record, reply, res } = exchange;
    if (reply.fault === 'hang') return;
    if (reply.fault === 'reset' && !isStreaming(record)) return exchange.resetSocket();
    for (const [name, value] of Object.entries(reply.headers ?? {})) res.setHeader(name, value);
    if (reply.retryAfter !== undefined) res.setHeader('retry-after', String(reply.retryAfter));
    if (reply.status && reply.status >= 400) return reply.errorBody === undefined ? sendError(res, reply.status, reply.errorCode) : sendJson(res, reply.status, reply.errorBody);
    if (reply.status && reply.status >= 300) return sendRaw(res, reply.status, 'text/plain', '');

    const fileId = /^\/v1\/files\/([^/]+)$/.exec(record.path)?.[1];
    if (record.method === 'POST' && record.path === '/v1/chat/completions') {
      if (reply.asOpenAI && refusesMaxTokens(record)) return sendJson(res, 400, MAX_TOKENS_REFUSED);
      const unknownFile = reply.asOpenAI && fileIdsOf(record).find((id) => !this.files.has(id));
      if (unknownFile) return sendJson(res, 400, { error: { message: `Invalid file '${unknownFile}'`, type: 'invalid_request_error', code: 'invalid_value' } });
      return isStreaming(record) ? this.streamCompletion(exchange) : this.sendCompletion(exchange);
    }
    if (record.method === 'POST' && record.path === '/v1/files') return this.storeFile(exchange);
    if (record.method === 'DELETE' && fileId) return this.deleteFile(exchange, fileId);
    sendJson(res, 404, { error: { message: `Unknown route ${record.method} ${record.path}`, type: 'invalid_request_error' } });
  }

  private async sendCompletion({ record, reply, res, gone, resetSocket }: Exchange): Promise<void> {
    const model = reply.model ?? String(record.body.model);
    if (reply.fault === 'malformed-json') return sendRaw(res, 200, 'application/json', '{"id":"chatcmpl-broken","choices":[{"mess');
    if (reply.fault === 'garbage') return sendRaw(res, 200, 'text/html', GARBAGE_HTML);
    if (reply.fault === 'reset-mid-body') {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '1000' });
      await new Promise<void>((resolve) => res.write('{"id":"chatcmpl-cut","choices":[{"mess', () => resolve()));
      return resetSocket();
    }
    if (reply.fault === 'error-body') return sendJson(res, 200, inBandError(reply));
    const completion = { id: this.newId('chatcmpl'), object: 'chat.completion', created: nowSeconds(), model };
    if (reply.fault === 'no-choices') return sendJson(res, 200, completion);
    const content = replyContent(record, reply);
    const message = reply.refusal === undefined ? { role: 'assistant', content } : { role: 'assistant', content: null, refusal: reply.refusal };
    const body = {
      ...completion,
      choices: [{ index: 0, message, finish_reason: reply.finishReason ?? 'stop' }],
      ...(reply.usage === false ? {} : { usage: replyUsage(record, reply, content) }),
    };
    if (reply.fault !== 'drip') return sendJson(res, 200, body);
    res.writeHead(200, { 'content-type': 'application/json' });
    await drip(res, Buffer.from(JSON.stringify(body)), reply, gone);
    res.end();
  }

  private async streamCompletion({ record, reply, res, gone, resetSocket }: Exchange): Promise<void> {
    const content = replyContent(record, reply);
    const withUsage = (record.body.stream_options as { include_usage?: boolean } | undefined)?.include_usage === true;
    const base = { id: this.newId('chatcmpl'), object: 'chat.completion.chunk', created: nowSeconds(), model: reply.model ?? String(record.body.model) };
    // As OpenAI does: with include_usage every chunk carries `usage: null` but the last.
    const chunk = (choice: Record<string, unknown> | undefined) => ({
      ...base,
      choices: choice && reply.fault !== 'no-choices' ? [{ index: 0, finish_reason: null, ...choice }] : [],
      ...(withUsage ? { usage: null } : {}),
    });
    let dripping = false;
    // Resolves once the chunk is handed to the socket: a reset that follows cannot swallow it.
    const send = async (data: unknown) => {
      const event = `data: ${JSON.stringify(data)}\n\n`;
      if (dripping) return drip(res, Buffer.from(event), reply, gone);
      await new Promise<void>((resolve) => res.write(event, () => resolve()));
    };

    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    await send(chunk({ delta: { role: 'assistant', content: '' } }));
    for (let i = 0; i < (reply.thinking ?? 0); i++) {
      if (reply.chunkDelayMs) await sleep(reply.chunkDelayMs, undefined, { signal: gone });
      if (gone.aborted) return;
      await send(chunk({ delta: { reasoning_content: 'Thinking it over. ' } }));
    }
    const pieces = splitContent(content, reply.chunks);
    const faultAt = reply.afterChunks ?? 1;
    for (let i = 0; i <= pieces.length; i++) {
      if (i === faultAt) {
        if (streamFault(reply, res, resetSocket)) return;
        dripping = reply.fault === 'drip';
      }
      if (i === pieces.length) break;
      if (i > 0 && reply.chunkDelayMs && !dripping) await sleep(reply.chunkDelayMs, undefined, { signal: gone });
      if (gone.aborted) return;
      await send(chunk({ delta: reply.refusal === undefined ? { content: pieces[i] } : { refusal: pieces[i] } }));
      record.chunksSent++;
    }
    await send(chunk({ delta: {}, finish_reason: reply.finishReason ?? 'stop' }));
    if (withUsage && reply.usage !== false) await send({ ...base, choices: [], usage: replyUsage(record, reply, content) });
    if (reply.fault === 'open-after-done') res.write('data: [DONE]\n\n');
    else if (reply.fault !== 'open-after-finish') res.end('data: [DONE]\n\n');
  }

  private async storeFile({ record, res, upload }: Exchange): Promise<void> {
    const purpose = String(record.body.purpose);
    if (!upload) {
      return sendJson(res, 400, { error: { message: 'Missing file', type: 'invalid_request_error' } });
    }
    const id = this.newId('file');
    const bytes = Buffer.from(await upload.arrayBuffer());
    this.files.set(id, { filename: upload.name, mimeType: upload.type, purpose, bytes });
    sendJson(res, 200, {
      id,
      object: 'file',
      bytes: bytes.length,
      created_at: nowSeconds(),
      filename: upload.name,
      purpose,
      status: 'processed',
    });
  }

  private deleteFile({ res }: Exchange, id: string): void {
    if (!this.files.delete(id)) {
      return sendJson(res, 404, { error: { message: `No such File object: ${id}`, type: 'invalid_request_error' } });
    }
    sendJson(res, 200, { id, object: 'file', deleted: true });
  }

  private newId(prefix: string): string {
    return `${prefix}-fake${this.nextId++}`;
  }
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const part of req) parts.push(part as Buffer);
  return Buffer.concat(parts);
}

/** JSON as parsed; a multipart upload as its printable fields, beside the file itself. */
async function parseBody(req: IncomingMessage, raw: Buffer): Promise<{ body: Record<string, unknown>; upload?: File }> {
  const type = req.headers['content-type'] ?? '';
  if (type.startsWith('multipart/form-data')) {
    const form = await new Response(new Uint8Array(raw), { headers: { 'content-type': type } }).formData();
    const file = form.get('file');
    const purpose = form.get('purpose');
    if (!(file instanceof File)) return { body: { purpose } };
    return { body: { purpose, filename: file.name, mimeType: file.type, size: file.size }, upload: file };
  }
  if (raw.length === 0) return { body: {} };
  try {
    return { body: JSON.parse(raw.toString('utf8')) as Record<string, unknown> };
  } catch {
    return { body: { unparsed: raw.toString('utf8') } };
  }
}

/** OpenAI's reasoning models refuse the deprecated `max_tokens`. */
function refusesMaxTokens(record: UpstreamRequest): boolean {
  return record.body.max_tokens !== undefined && /^(o\d|gpt-5)/.test(String(record.body.model));
}

/** The provider files a chat request's messages name in file parts. */
function fileIdsOf(record: UpstreamRequest): string[] {
  const messages = (record.body.messages ?? []) as WireMessage[];
  return messages.flatMap((message) =>
    typeof message.content === 'string' ? [] : message.content.flatMap((part) => (part.file?.file_id ? [part.file.file_id] : [])),
  );
}

const MAX_TOKENS_REFUSED = {
  error: {
    message: "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
    type: 'invalid_request_error',
    param: 'max_tokens',
    code: 'unsupported_parameter',
  },
};

function isStreaming(record: UpstreamRequest): boolean {
  return record.body.stream === true;
}

function replyContent(record: UpstreamRequest, reply: UpstreamReply): string {
  const given = reply.refusal ?? reply.content;
  if (given !== undefined) return given;
  const messages = (record.body.messages ?? []) as WireMessage[];
  const lastUser = messages.filter((message) => message.role === 'user').at(-1);
  return `Echo: ${lastUser ? textOf(lastUser) : ''}`;
}

type WireMessage = { role: string; content: string | { type: string; text?: string; file?: { file_id?: string } }[] };

/** A message's text: its content, or the text of its content parts (file parts have none). */
function textOf(message: WireMessage): string {
  if (typeof message.content === 'string') return message.content;
  return message.content.map((part) => part.text ?? '').join('');
}

function replyUsage(record: UpstreamRequest, reply: UpstreamReply, content: string) {
  if (reply.usage) return reply.usage;
  const messages = (record.body.messages ?? []) as WireMessage[];
  const prompt = messages.reduce((sum, message) => sum + countWords(textOf(message)), 0);
  const completion = countWords(content);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

function countWords(text: string): number {
  return text.split(/\s+/).filter(Boolean).length;
}

/** `count` near-equal pieces (by code point), or one per word with its trailing space. */
function splitContent(content: string, count: number | undefined): string[] {
  if (count === undefined) return content.match(/\S+\s*|\s+/g) ?? [];
  const codePoints = [...content];
  const size = Math.ceil(codePoints.length / count);
  const pieces: string[] = [];
  for (let i = 0; i < codePoints.length; i += size) pieces.push(codePoints.slice(i, i + size).join(''));
  return pieces;
}

/** What a confused proxy or a captive portal answers instead of a completion. */
const GARBAGE_HTML = `<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><p>${UPSTREAM_ERROR_TEXT}</p></body></html>`;

/**
 * Lines amid an event stream that no parser may act on: an HTML page, lines with no field or unknown
 * fields, bytes that are not UTF-8 (each dispatches no event: none has `data`), then `data` events
 * whose JSON is not a completion chunk (an object without choices, an array, content that is no string).
 */
const GARBAGE_LINES = Buffer.concat([
  Buffer.from(`${GARBAGE_HTML}\ngarbage without a field\nunknown-field: ${UPSTREAM_ERROR_TEXT}\nretry: soon\n`),
  Buffer.from([0xff, 0xfe, 0x00, 0x80, 0x0a, 0x0a]),
  Buffer.from(`data: {"unexpected":"<script>${UPSTREAM_ERROR_TEXT}</script>"}\n\n`),
  Buffer.from('data: [1,2,3]\n\n'),
  Buffer.from('data: {"choices":[{"index":0,"delta":{"content":{"$ne":null}}},null]}\n\n'),
  Buffer.from('data: {"choices":"not a list","model":{"name":"not a string"},"usage":"lots"}\n\n'),
]);

/** Writes `bytes` one at a time, each `chunkDelayMs` (default 100) after the one before, until done or the client leaves. */
async function drip(res: ServerResponse, bytes: Buffer, reply: UpstreamReply, gone: AbortSignal): Promise<void> {
  for (const byte of bytes) {
    await sleep(reply.chunkDelayMs ?? 100, undefined, { signal: gone });
    res.write(Buffer.of(byte));
  }
}

/** Carries out a streaming fault at its chunk; true when the stream is over (or left hanging). */
function streamFault(reply: UpstreamReply, res: ServerResponse, resetSocket: () => void): boolean {
  switch (reply.fault) {
    case 'reset':
      resetSocket();
      return true;
    case 'malformed-json':
      res.end('data: {"id":"chatcmpl-broken","choices":[{"delta":\n\n');
      return true;
    case 'error-body':
      res.end(`data: ${JSON.stringify(inBandError(reply))}\n\n`);
      return true;
    case 'end-early':
      res.end();
      return true;
    case 'stall':
      return true;
    case 'garbage':
      res.write(GARBAGE_LINES);
      return false;
    default:
      return false;
  }
}

/** The error of `fault: 'error-body'`, sent with a 200. */
const inBandError = (reply: UpstreamReply) => reply.errorBody ?? { error: { message: UPSTREAM_ERROR_TEXT, type: 'server_error' } };

function sendError(res: ServerResponse, status: number, code?: string): void {
  const type = code ?? (status === 429 ? 'rate_limit_exceeded' : status >= 500 ? 'server_error' : 'invalid_request_error');
  sendJson(res, status, { error: { message: UPSTREAM_ERROR_TEXT, type, code: code ?? null } });
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  sendRaw(res, status, 'application/json', JSON.stringify(body));
}

function sendRaw(res: ServerResponse, status: number, contentType: string, body: string): void {
  res.writeHead(status, { 'content-type': contentType }).end(body);
}

function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}
