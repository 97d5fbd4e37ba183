import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ApiError } from '../../src/http/errors.js';
import { within } from '../../src/providers/abort.js';
import { type OpenAICompatibleOptions, OpenAICompatibleAdapter } from '../../src/providers/openai-compatible.js';
import {
  type ChatRequest,
  EmptyAnswer,
  type ProviderAdapter,
  ProviderError,
  ProviderRateLimited,
  ProviderRefusedDeletion,
  ProviderTimeout,
  type ReplyEnd,
} from '../../src/providers/types.js';
import { FakeUpstream, UPSTREAM_ERROR_TEXT, type UpstreamReply } from '../support/fake-upstream.js';

let fake: FakeUpstream;
beforeAll(async () => {
  fake = await FakeUpstream.start();
});
afterAll(() => fake.close());
beforeEach(() => fake.reset());

const API_KEY = 'sk-test-key-0123';
const MESSAGES: ChatRequest['messages'] = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: 'Hello there' },
];

function adapter(options: Partial<OpenAICompatibleOptions> = {}): OpenAICompatibleAdapter {
  return new OpenAICompatibleAdapter({ name: 'openai', apiKey: API_KEY, baseURL: fake.url, supportsFiles: true, maxRetries: 2, ...options });
}

/** A request bounded by a deadline `timeoutMs` from now, as the chat service builds it. */
function chat(timeoutMs = 10_000, overrides: Partial<ChatRequest> = {}): ChatRequest {
  return {
    model: 'gpt-4o-mini',
    messages: MESSAGES,
    maxOutputTokens: 64,
    signal: AbortSignal.timeout(timeoutMs),
    deadline: Date.now() + timeoutMs,
    ...overrides,
  };
}

/** A stream's deltas, then its end, as one list. */
type StreamEvent = { type: 'delta'; content: string } | ({ type: 'done' } & ReplyEnd);

/** Every delta a stream gives, then its end, and what it failed with if it did. */
async function drain(provider: ProviderAdapter, request: ChatRequest): Promise<{ events: StreamEvent[]; error?: unknown }> {
  const events: StreamEvent[] = [];
  try {
    const end = await provider.stream(request, (content) => {
      events.push({ type: 'delta', content });
    });
    events.push({ type: 'done', ...end });
    return { events };
  } catch (error) {
    return { events, error };
  }
}

function deltas(events: StreamEvent[]): string[] {
  return events.flatMap((event) => (event.type === 'delta' ? [event.content] : []));
}

/** A stream's events written as `script` writes them, by an upstream of its own that `use` calls at its base URL. */
async function withScriptedStream<T>(script: (res: ServerResponse) => Promise<void>, use: (baseURL: string) => Promise<T>): Promise<T> {
  const upstream = createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    void script(res);
  });
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
  try {
    return await use(`http://127.0.0.1:${(upstream.address() as AddressInfo).port}/v1`);
  } finally {
    upstream.closeAllConnections();
    await new Promise((resolve) => upstream.close(resolve));
  }
}

/** One `data:` event of a stream: a chunk of `choice`. */
const streamed = (choice: object, extra: object = {}) => `data: ${JSON.stringify({ model: 'local-model', choices: [choice], ...extra })}\n\n`;

/** A whole reply of three deltas in one write: what follows the first delta is in the reader before it is given. */
const wholeReplyAtOnce = async (res: ServerResponse) => {
  res.end(
    ['one ', 'two ', 'three'].map((word) => streamed({ index: 0, delta: { content: word } })).join('') +
      streamed({ index: 0, delta: {}, finish_reason: 'stop' }) +
      'data: [DONE]\n\n',
  );
};

/** What of an error can reach a client: its problem detail, extensions and headers. */
function clientVisible(error: unknown): string {
  const { message, extensions, headers } = error as ApiError;
  return JSON.stringify({ message, extensions, headers });
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => expect.fail('expected a rejection'),
    (error: unknown) => error,
  );
}

describe('complete', () => {
  it('sends the model, messages and max_tokens with the key, and returns content, model and usage', async () => {
    fake.enqueue({ model: 'gpt-4o-mini-2024-07-18' });
    const completion = await adapter().complete(chat());
    expect(completion).toEqual({
      content: 'Echo: Hello there',
      model: 'gpt-4o-mini-2024-07-18',
      usage: { promptTokens: 4, completionTokens: 3, totalTokens: 7 },
      cutShort: false,
    });
    expect(fake.requests).toHaveLength(1);
    const [request] = fake.requests;
    expect(request!.method).toBe('POST');
    expect(request!.path).toBe('/v1/chat/completions');
    expect(request!.headers.authorization).toBe(`Bearer ${API_KEY}`);
    expect(request!.body).toEqual({
      model: 'gpt-4o-mini',
      messages: MESSAGES,
      max_tokens: 64,
    });
  });

  it('sends only role and content of each message', async () => {
    const messages = [{ role: 'user' as const, content: 'Hi', id: 'row-id', createdAt: new Date() }];
    await adapter().complete(chat(10_000, { messages }));
    expect(fake.requests[0]!.body.messages).toEqual([{ role: 'user', content: 'Hi' }]);
  });

  it('gives null usage when the upstream reports none, and the requested model when it names none', async () => {
    fake.enqueue({ usage: false, model: '' });
    expect(await adapter().complete(chat())).toEqual({ content: 'Echo: Hello there', model: 'gpt-4o-mini', usage: null, cutShort: false });
  });

  it.each<[string, UpstreamReply, typeof ProviderError | typeof ProviderRateLimited, number]>([
    ['400', { status: 400 }, ProviderError, 1],
    ['401 (a bad key)', { status: 401 }, ProviderError, 1],
    ['404 (an unknown model)', { status: 404 }, ProviderError, 1],
    ['malformed JSON', { fault: 'malformed-json' }, ProviderError, 1],
    ['a 200 without choices', { fault: 'no-choices' }, ProviderError, 1],
    ['a 200 with an error body', { fault: 'error-body' }, ProviderError, 1],
    ['500 every time', { status: 500 }, ProviderError, 3],
    ['503 every time', { status: 503 }, ProviderError, 3],
    ['429 every time', { status: 429 }, ProviderRateLimited, 3],
    ['a 429 for a quota used up (insufficient_quota)', { status: 429, errorCode: 'insufficient_quota', retryAfter: 1 }, ProviderError, 1],
    ['a reset connection every time', { fault: 'reset' }, ProviderError, 3],
    ['a connection reset after the headers every time', { fault: 'reset-mid-body' }, ProviderError, 3],
  ])('maps %s to its provider error, retried only if transient, without upstream text', async (_, reply, errorClass, requests) => {
    fake.setDefault(reply);
    const error = await rejection(adapter().complete(chat()));
    expect(error).toBeInstanceOf(errorClass);
    expect(fake.requests).toHaveLength(requests);
    expect(clientVisible(error)).not.toContain('LEAK');
    expect(clientVisible(error)).not.toContain(UPSTREAM_ERROR_TEXT);
  });

  it("maps the upstream's context_length_exceeded to 400 CONTEXT_TOO_LONG, once: the client's to shorten", async () => {
    fake.setDefault({ status: 400, errorCode: 'context_length_exceeded' });
    const error = await rejection(adapter().complete(chat()));
    expect(error).toBeInstanceOf(ApiError);
    expect(error).toMatchObject({ status: 400, code: 'CONTEXT_TOO_LONG' });
    expect(fake.requests).toHaveLength(1);
    expect(clientVisible(error)).not.toContain(UPSTREAM_ERROR_TEXT);
  });

  it.each([
    ['vLLM', { object: 'error', message: "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.", type: 'BadRequestError', code: 400 }],
    ['OpenRouter', { error: { code: 400, message: "This endpoint's maximum context length is 8192 tokens. However, you requested about 9000 tokens." } }],
    ['llama.cpp', { error: { code: 400, type: 'exceed_context_size_error', message: 'the request exceeds the available context size', n_ctx: 4096 } }],
  ])("maps %s's words for a context overflow to 400 CONTEXT_TOO_LONG too: no code of OpenAI's names it", async (_, errorBody) => {
    fake.setDefault({ status: 400, errorBody });
    expect(await rejection(adapter().complete(chat()))).toMatchObject({ status: 400, code: 'CONTEXT_TOO_LONG' });
    expect(fake.requests).toHaveLength(1);
  });

  it('answers a 400 of another kind as the provider failing (502), not as a context overflow', async () => {
    fake.setDefault({ status: 400, errorBody: { error: { code: 400, message: 'Invalid value for temperature' } } });
    const error = await rejection(adapter().complete(chat()));
    expect(error).toBeInstanceOf(ProviderError);
    expect(error).toMatchObject({ status: 502, code: 'PROVIDER_ERROR', message: 'The AI provider failed to answer' });
  });

  // A misspelt model answered as an outage left a client nothing to tell the two apart by.
  it.each<[string, number, unknown]>([
    ['OpenAI', 404, { error: { message: 'The model `gpt-9` does not exist or you do not have access to it.', type: 'invalid_request_error', code: 'model_not_found' } }],
    ['Ollama', 404, { error: { message: 'model "llama9" not found, try pulling it first', type: 'api_error' } }],
    ['vLLM', 404, { object: 'error', message: 'The model `llama9` does not exist.', type: 'NotFoundError', code: 404 }],
    ['OpenRouter', 400, { error: { code: 400, message: 'llama9 is not a valid model ID' } }],
  ])("says when %s has no model of the name asked for (502, once), JSON and streamed", async (_, status, errorBody) => {
    fake.setDefault({ status, errorBody });
    for (const call of [adapter().complete(chat()), drain(adapter(), chat()).then(({ error }) => Promise.reject(error))]) {
      const error = await rejection(call);
      expect(error).toMatchObject({ status: 502, code: 'PROVIDER_ERROR', message: 'The AI provider has no model of the name this chat asked for' });
      expect(clientVisible(error)).not.toContain('llama9');
    }
    expect(fake.requests).toHaveLength(2);
  });

  it('reads a long error that names models, but none missing, as the provider failing, without scanning it over and over', async () => {
    fake.setDefault({ status: 404, errorBody: { error: { message: `Unknown route. Models: ${'model-a model-b '.repeat(60_000)}` } } });
    expect(await rejection(adapter().complete(chat()))).toMatchObject({ status: 502, message: 'The AI provider failed to answer' });
  });

  describe('an error sent with a 200, as OpenRouter sends those of the model’s provider', () => {
    const rateLimited = { error: { code: 429, message: 'Rate limited upstream' } };

    it('is failed as the status its code names: a 429 retried, then PROVIDER_RATE_LIMITED, its text for the log', async () => {
      fake.enqueue({ fault: 'error-body', errorBody: rateLimited }, { content: 'after the wait' });
      expect((await adapter().complete(chat())).content).toBe('after the wait');
      fake.setDefault({ fault: 'error-body', errorBody: rateLimited });
      const error = await rejection(adapter({ maxRetries: 1 }).complete(chat()));
      expect(error).toBeInstanceOf(ProviderRateLimited);
      expect(String((error as Error).cause)).toContain('Rate limited upstream');
      expect(clientVisible(error)).not.toContain('Rate limited upstream');
      expect(fake.requests).toHaveLength(4);
    });

    it('is retried as a chunk before the first delta; after it, whatever status it names, the stream broke', async () => {
      fake.enqueue({ fault: 'error-body', afterChunks: 0, errorBody: { error: { code: 502, message: 'Provider disconnected' } } }, { content: 'made it' });
      const { events, error } = await drain(adapter(), chat());
      expect([deltas(events), error]).toEqual([['made ', 'it'], undefined]);
      fake.enqueue({ content: 'one two three', fault: 'error-body', afterChunks: 1, errorBody: rateLimited });
      const broken = await drain(adapter(), chat());
      expect(broken.error).toBeInstanceOf(ProviderError);
      expect(broken.error).not.toBeInstanceOf(ProviderRateLimited);
      expect(String((broken.error as Error).cause)).toContain('Rate limited upstream');
      expect(fake.requests).toHaveLength(3);
    });
  });

  it('asks for answers uncompressed, which a proxy that compresses what names no coding then sends', async () => {
    const upstream = createServer((req, res) => {
      const body = JSON.stringify({ id: 'c', object: 'chat.completion', model: 'm', choices: [{ index: 0, message: { role: 'assistant', content: 'plain' }, finish_reason: 'stop' }] });
      const gzipped = req.headers['accept-encoding'] !== 'identity';
      res.writeHead(200, { 'content-type': 'application/json', ...(gzipped && { 'content-encoding': 'gzip' }) }).end(gzipped ? gzipSync(body) : body);
    });
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    try {
      const reply = await adapter({ baseURL: `http://127.0.0.1:${(upstream.address() as AddressInfo).port}/v1` }).complete(chat());
      expect(reply.content).toBe('plain');
    } finally {
      await new Promise((resolve) => upstream.close(resolve));
    }
  });

  it('keeps no key an upstream quotes back in what it logs of its refusal', async () => {
    const upstream = createServer((req, res) => {
      res.writeHead(401, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: `Invalid key ${req.headers.authorization}` } }));
    });
    await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
    try {
      const error = await rejection(adapter({ baseURL: `http://127.0.0.1:${(upstream.address() as AddressInfo).port}/v1` }).complete(chat()));
      const logged = String((error as Error).cause);
      expect(logged).toContain('Invalid key Bearer [redacted]');
      expect(logged).not.toContain(API_KEY);
    } finally {
      await new Promise((resolve) => upstream.close(resolve));
    }
  });

  it('retries 5xx and 429 at most maxRetries times, then answers', async () => {
    fake.enqueue({ status: 500 }, { status: 429, retryAfter: 0 }, { content: 'third time lucky' }, { content: 'never asked for' });
    expect((await adapter({ maxRetries: 2 }).complete(chat())).content).toBe('third time lucky');
    expect(fake.requests).toHaveLength(3);
  });

  it('retries an answer whose connection is reset after the headers, half-way through its body', async () => {
    fake.enqueue({ fault: 'reset-mid-body' }, { content: 'whole this time' });
    expect((await adapter().complete(chat())).content).toBe('whole this time');
    expect(fake.requests).toHaveLength(2);
  });

  it('makes exactly one attempt with maxRetries 0', async () => {
    fake.enqueue({ status: 503 }, { content: 'never asked for' });
    expect(await rejection(adapter({ maxRetries: 0 }).complete(chat()))).toBeInstanceOf(ProviderError);
    expect(fake.requests).toHaveLength(1);
  });

  it('gives ProviderRateLimited 1 second when the last 429 named no Retry-After', async () => {
    fake.setDefault({ status: 429 });
    const error = (await rejection(adapter({ maxRetries: 0 }).complete(chat()))) as ProviderRateLimited;
    expect(error.retryAfterSeconds).toBe(1);
    expect(error.headers).toEqual({ 'retry-after': '1' });
  });

  it('waits the Retry-After seconds before retrying', async () => {
    fake.enqueue({ status: 429, retryAfter: 1 }, {});
    await adapter().complete(chat());
    const [first, second] = fake.requests;
    expect(second!.receivedAt - first!.receivedAt).toBeGreaterThanOrEqual(950);
  });

  it('waits the retry-after-ms milliseconds before retrying', async () => {
    fake.enqueue({ status: 503, headers: { 'retry-after-ms': '300' } }, {});
    await adapter().complete(chat());
    const [first, second] = fake.requests;
    expect(second!.receivedAt - first!.receivedAt).toBeGreaterThanOrEqual(280);
  });

  it('gives up at once, before the deadline, when a Retry-After wait would pass it', async () => {
    fake.enqueue({ status: 429, retryAfter: 30 });
    const request = chat(2_000);
    const error = await rejection(adapter().complete(request));
    expect(request.signal.aborted).toBe(false); // not a timeout: it did not wait for the deadline
    expect(error).toBeInstanceOf(ProviderRateLimited);
    expect((error as ProviderRateLimited).retryAfterSeconds).toBe(30);
    expect(fake.requests).toHaveLength(1);
  });

  it('reads a Retry-After given as an HTTP date', async () => {
    fake.enqueue({ status: 429, retryAfter: new Date(Date.now() + 30_000).toUTCString() });
    const error = (await rejection(adapter().complete(chat(2_000)))) as ProviderRateLimited;
    expect(error).toBeInstanceOf(ProviderRateLimited);
    expect(error.retryAfterSeconds).toBeGreaterThanOrEqual(28);
    expect(error.retryAfterSeconds).toBeLessThanOrEqual(31);
  });

  it('passes on at most an hour of an absurd Retry-After, in whole seconds, without waiting for it', async () => {
    for (const reply of [{ retryAfter: '99999999999' }, { headers: { 'retry-after-ms': '1e300' } }, { headers: { 'retry-after-ms': 'Infinity' } }]) {
      fake.reset();
      fake.setDefault({ status: 429, ...reply });
      const error = (await rejection(adapter().complete(chat(2_000)))) as ProviderRateLimited;
      expect(error, JSON.stringify(reply)).toBeInstanceOf(ProviderRateLimited);
      expect(error.headers).toEqual({ 'retry-after': '3600' });
      expect(error.extensions).toMatchObject({ retryAfter: 3600 });
      expect(fake.requests).toHaveLength(1);
    }
  });

  it('waits out an absurd Retry-After until the signal when no deadline is given, never retrying at once', async () => {
    // Unbounded, 1e300 ms was a timer past Node's 2^31 ms, which Node fires after 1 ms.
    fake.setDefault({ status: 429, headers: { 'retry-after-ms': '1e300' } });
    const error = await rejection(adapter().complete(chat(500, { deadline: undefined })));
    expect(error).toBeInstanceOf(ProviderTimeout);
    expect(fake.requests).toHaveLength(1);
  });

  it('gives up at once with ProviderError when a 5xx Retry-After would pass the deadline', async () => {
    fake.enqueue({ status: 503, retryAfter: 30 });
    const request = chat(2_000);
    expect(await rejection(adapter().complete(request))).toBeInstanceOf(ProviderError);
    expect(request.signal.aborted).toBe(false);
    expect(fake.requests).toHaveLength(1);
  });

  it('ends a hanging upstream with ProviderTimeout at the deadline and closes its connection', async () => {
    fake.enqueue({ fault: 'hang' });
    const request = chat(300);
    expect(await rejection(adapter().complete(request))).toBeInstanceOf(ProviderTimeout);
    expect(request.signal.aborted).toBe(true);
    await fake.waitForClientClose();
  });

  it('bounds the backoff waits by the signal too, when no deadline is given', async () => {
    fake.setDefault({ status: 500 });
    const error = await rejection(adapter({ maxRetries: 10 }).complete(chat(400, { deadline: undefined })));
    expect(error).toBeInstanceOf(ProviderTimeout);
    expect(fake.requests.length).toBeLessThan(11);
  });

  it('rethrows the reason of an abort that is not the deadline, and closes the upstream connection', async () => {
    fake.enqueue({ fault: 'hang' });
    const client = new AbortController();
    const deadline = AbortSignal.timeout(10_000);
    const pending = adapter().complete(chat(10_000, { signal: AbortSignal.any([deadline, client.signal]) }));
    await fake.waitForRequests(1);
    const clientGone = new Error('client went away');
    client.abort(clientGone);
    expect(await rejection(pending)).toBe(clientGone);
    expect(deadline.aborted).toBe(false);
    await fake.waitForClientClose();
  });

  it('stops a Retry-After wait when the client leaves, without another attempt', async () => {
    fake.enqueue({ status: 429, retryAfter: 5 }, {});
    const client = new AbortController();
    const pending = adapter().complete(chat(10_000, { signal: client.signal }));
    await fake.waitForRequests(1);
    client.abort();
    const error = await rejection(pending);
    expect(error).not.toBeInstanceOf(ApiError);
    expect((error as Error).name).toBe('AbortError');
    expect(fake.requests).toHaveLength(1);
  });

  it('maps a refused connection to ProviderError after the retries', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const { port } = closed.address() as AddressInfo;
    await new Promise((resolve) => closed.close(resolve));
    const error = await rejection(adapter({ baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 1 }).complete(chat()));
    expect(error).toBeInstanceOf(ProviderError);
  });
});

describe('stream', () => {
  it('yields each upstream chunk as its own delta, in order, then done with model and usage', async () => {
    fake.enqueue({ content: 'one two three', model: 'gpt-4o-mini-2024-07-18' });
    const { events, error } = await drain(adapter(), chat());
    expect(error).toBeUndefined();
    expect(events).toEqual([
      { type: 'delta', content: 'one ' },
      { type: 'delta', content: 'two ' },
      { type: 'delta', content: 'three' },
      { type: 'done', model: 'gpt-4o-mini-2024-07-18', usage: { promptTokens: 4, completionTokens: 3, totalTokens: 7 }, cutShort: false },
    ]);
    expect(fake.requests[0]!.body).toEqual({
      model: 'gpt-4o-mini',
      messages: MESSAGES,
      max_tokens: 64,
      stream: true,
      stream_options: { include_usage: true },
    });
    expect(fake.requests[0]!.headers.authorization).toBe(`Bearer ${API_KEY}`);
  });

  it('passes a delta on before the upstream has sent the rest (no buffering)', async () => {
    fake.enqueue({ content: 'a b c d e', chunkDelayMs: 100 });
    const received: { content: string; chunksSent: number; answered: boolean }[] = [];
    await adapter().stream(chat(), (content) => {
      const { chunksSent, answered } = fake.requests[0]!;
      received.push({ content, chunksSent, answered });
    });
    expect(received.map((delta) => delta.content).join('')).toBe('a b c d e');
    expect(received[0]).toMatchObject({ content: 'a ', answered: false });
    expect(received[0]!.chunksSent).toBeLessThan(5);
    expect(fake.requests[0]!.answered).toBe(true);
  });

  it('gives null usage when the server ignores stream_options', async () => {
    fake.enqueue({ usage: false });
    const { events } = await drain(adapter(), chat());
    expect(events.at(-1)).toEqual({ type: 'done', model: 'gpt-4o-mini', usage: null, cutShort: false });
  });

  it('retries before the first delta, then streams', async () => {
    fake.enqueue({ status: 503 }, { status: 429, retryAfter: 0 }, { content: 'made it' });
    const { events, error } = await drain(adapter(), chat());
    expect(error).toBeUndefined();
    expect(deltas(events).join('')).toBe('made it');
    expect(fake.requests).toHaveLength(3);
  });

  it("counts as progress (its deadline's) a chunk with text or thinking in it, not a chunk of nothing", async () => {
    let progress = 0;
    const chunks = [
      streamed({ index: 0, delta: {} }),
      `data: ${JSON.stringify({ model: 'local-model', choices: [] })}\n\n`,
      streamed({ index: 0, delta: { reasoning_content: 'Thinking.' } }),
      streamed({ index: 0, delta: { reasoning: 'Still thinking.' } }),
      streamed({ index: 0, delta: { content: '' } }),
      streamed({ index: 0, delta: { content: 'Answer.' } }),
      streamed({ index: 0, delta: {}, finish_reason: 'stop' }),
      'data: [DONE]\n\n',
    ];
    const { events, error } = await withScriptedStream(
      async (res) => void res.end(chunks.join('')),
      (baseURL) => drain(adapter({ baseURL }), chat(10_000, { onProgress: () => progress++ })),
    );
    expect([deltas(events), error]).toEqual([['Answer.'], undefined]);
    expect(progress).toBe(3);
  });

  it('retries a stream whose connection is reset after the headers, before its first delta', async () => {
    fake.enqueue({ content: 'never seen', fault: 'reset', afterChunks: 0 }, { content: 'made it' });
    const { events, error } = await drain(adapter(), chat());
    expect(error).toBeUndefined();
    expect(deltas(events)).toEqual(['made ', 'it']);
    expect(fake.requests).toHaveLength(2);
  });

  it.each<[string, UpstreamReply, string[]]>([
    ['a reset connection', { content: 'one two three four', fault: 'reset', afterChunks: 2 }, ['one ', 'two ']],
    ['a malformed chunk', { content: 'one two three', fault: 'malformed-json', afterChunks: 1 }, ['one ']],
    ['an error event', { content: 'one two three', fault: 'error-body', afterChunks: 2 }, ['one ', 'two ']],
    ['an end without finish_reason', { content: 'one two three', fault: 'end-early', afterChunks: 2 }, ['one ', 'two ']],
  ])('yields the deltas before %s, then throws ProviderError without retrying', async (_, reply, before) => {
    fake.enqueue(reply, { content: 'never asked for' });
    const { events, error } = await drain(adapter(), chat());
    expect(deltas(events)).toEqual(before);
    expect(events.some((event) => event.type === 'done')).toBe(false);
    expect(error).toBeInstanceOf(ProviderError);
    expect(clientVisible(error)).not.toContain('LEAK');
    expect(fake.requests).toHaveLength(1);
  });

  // As a refusal's status is logged with it: what the upstream's support asks for.
  it("logs an error sent with a 200 (its body, an OpenRouter-style status in it, a stream's chunk) with the upstream's id of the request", async () => {
    const headers = { 'x-request-id': 'req_inband7' };
    fake.enqueue(
      { fault: 'error-body', headers },
      { fault: 'error-body', headers, errorBody: { error: { code: 400, message: 'Bad request' } } },
      { content: 'one two three', fault: 'error-body', afterChunks: 2, headers },
    );
    const body = await rejection(adapter().complete(chat()));
    const status = await rejection(adapter().complete(chat()));
    const { error: streamed } = await drain(adapter(), chat());
    for (const error of [body, status, streamed]) expect(String((error as Error).cause)).toContain('(upstream request id req_inband7)');
    expect(fake.requests).toHaveLength(3);
  });

  it('rethrows a client abort mid-stream after the deltas so far, and closes the upstream connection', async () => {
    fake.enqueue({ content: 'one two three', fault: 'stall', afterChunks: 2 });
    const client = new AbortController();
    const seen: string[] = [];
    const clientGone = new Error('client went away');
    const error = await rejection(
      adapter().stream(chat(10_000, { signal: client.signal }), (content) => {
        seen.push(content);
        if (seen.length === 2) client.abort(clientGone);
      }),
    );
    expect(error).toBe(clientGone);
    expect(seen).toEqual(['one ', 'two ']);
    await fake.waitForClientClose();
  });

  // The client left while the upstream, its text over, held the response open: the reply was whole. But
  // not from a server that puts a finish_reason on every chunk: its chunk of no text may be a keep-alive.
  it.each<[string, string[], boolean]>([
    ['text, then a last chunk of no text with a finish_reason, and the usage', [streamed({ index: 0, delta: { content: 'All ' } }), streamed({ index: 0, delta: { content: 'said.' } }), streamed({ index: 0, delta: {}, finish_reason: 'stop' }), `data: ${JSON.stringify({ choices: [], usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 } })}\n\n`], true],
    ['text with a finish_reason on every chunk, and one of no text', [streamed({ index: 0, delta: { content: 'All ' }, finish_reason: 'stop' }), streamed({ index: 0, delta: { content: 'said.' }, finish_reason: 'stop' }), streamed({ index: 0, delta: {}, finish_reason: 'stop' })], false],
  ])('takes a reply as whole when the call is aborted after %s: only when its text is over for sure', async (_, chunks, whole) => {
    const clientGone = new Error('client went away');
    const client = new AbortController();
    const script = async (res: ServerResponse) => {
      res.write(chunks.join(''));
      // The client leaves while the response stays open (no [DONE]), well before the drain's second of silence.
      setTimeout(() => client.abort(clientGone), 100);
    };
    const { events, error } = await withScriptedStream(script, (baseURL) => drain(adapter({ baseURL }), chat(10_000, { signal: client.signal })));
    expect(deltas(events)).toEqual(['All ', 'said.']);
    if (whole) expect([events.at(-1), error]).toEqual([expect.objectContaining({ type: 'done', usage: { promptTokens: 5, completionTokens: 2, totalTokens: 7 } }), undefined]);
    else expect(error).toBe(clientGone);
  });

  it('ends a stalled stream with ProviderTimeout at the deadline, after the deltas so far', async () => {
    fake.enqueue({ content: 'one two three', fault: 'stall', afterChunks: 1 });
    const { events, error } = await drain(adapter(), chat(500));
    expect(deltas(events)).toEqual(['one ']);
    expect(error).toBeInstanceOf(ProviderTimeout);
    await fake.waitForClientClose();
  });

  it('ends with done at [DONE] when the upstream leaves the response open after it, and lets that connection go', async () => {
    fake.enqueue({ content: 'one two', fault: 'open-after-done' });
    const { events, error } = await drain(adapter(), chat(3_000));
    expect(error).toBeUndefined();
    expect(events.at(-1)).toEqual({ type: 'done', model: 'gpt-4o-mini', usage: { promptTokens: 4, completionTokens: 2, totalTokens: 6 }, cutShort: false });
    await fake.waitForClientClose();
  });

  it('ends with done soon after the finish_reason when the upstream then neither sends [DONE] nor ends the response', async () => {
    fake.enqueue({ content: 'one two', fault: 'open-after-finish' });
    const started = Date.now();
    const { events, error } = await drain(adapter(), chat(5_000));
    expect(error).toBeUndefined();
    expect(events.at(-1)).toEqual({ type: 'done', model: 'gpt-4o-mini', usage: { promptTokens: 4, completionTokens: 2, totalTokens: 6 }, cutShort: false });
    expect(Date.now() - started).toBeLessThan(3_000);
    await fake.waitForClientClose();
  });

  it('keeps the connection of a stream that ended for the next call', async () => {
    fake.enqueue({ content: 'first' }, { content: 'second' });
    const provider = adapter();
    expect(deltas((await drain(provider, chat())).events)).toEqual(['first']);
    await new Promise((resolve) => setTimeout(resolve, 300)); // the first body's end, read after its [DONE]
    expect(deltas((await drain(provider, chat())).events)).toEqual(['second']);
    expect(fake.requests[1]!.clientPort).toBe(fake.requests[0]!.clientPort);
  });

  it.each([
    ['all in one write', Number.POSITIVE_INFINITY],
    ['in writes of 5 bytes, cut within events, lines and characters', 5],
  ])('reads the events however the body comes in pieces: %s', async (_, pieceBytes) => {
    const body = Buffer.from(
      ': a comment\n\n' +
        streamed({ index: 0, delta: { role: 'assistant', content: 'héllo ' } }) +
        streamed({ index: 0, delta: { content: '🙂 wörld' } }) +
        // The last words and the finish_reason in one chunk, as some servers send them.
        streamed({ index: 0, delta: { content: '!' }, finish_reason: 'stop' }) +
        `data: ${JSON.stringify({ choices: [], usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 } })}\n\n` +
        'data: [DONE]\n\n',
    );
    const script = async (res: ServerResponse) => {
      for (let at = 0; at < body.length; at += pieceBytes) {
        res.write(body.subarray(at, at + pieceBytes));
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
      res.end();
    };
    const { events, error } = await withScriptedStream(script, (baseURL) => drain(adapter({ baseURL }), chat()));
    expect(error).toBeUndefined();
    expect(events).toEqual([
      { type: 'delta', content: 'héllo ' },
      { type: 'delta', content: '🙂 wörld' },
      { type: 'delta', content: '!' },
      { type: 'done', model: 'local-model', usage: { promptTokens: 5, completionTokens: 3, totalTokens: 8 }, cutShort: false },
    ]);
  });

  it('fails at [DONE] with nothing given when no chunk has choices: no text is not a reply, and its usage is told', async () => {
    fake.enqueue({ fault: 'no-choices', usage: { prompt_tokens: 3, completion_tokens: 0, total_tokens: 3 } });
    const { events, error } = await drain(adapter(), chat());
    expect(error).toBeInstanceOf(EmptyAnswer);
    expect((error as EmptyAnswer).usage).toEqual({ promptTokens: 3, completionTokens: 0, totalTokens: 3 });
    expect(deltas(events)).toEqual([]);
  });

  // [DONE] is the protocol's own end: servers that send no finish_reason (Gemini's OpenAI proxies, older
  // local servers) had every streamed answer stored as incomplete, and answered 502.
  it('takes a reply whole at [DONE] though no chunk had a finish_reason', async () => {
    const script = async (res: ServerResponse) => {
      res.end(['Hello ', 'world.'].map((word) => streamed({ index: 0, delta: { content: word } })).join('') + 'data: [DONE]\n\n');
    };
    const { events, error } = await withScriptedStream(script, (baseURL) => drain(adapter({ baseURL }), chat()));
    expect(error).toBeUndefined();
    expect(deltas(events)).toEqual(['Hello ', 'world.']);
    expect(events.at(-1)).toMatchObject({ type: 'done' });
  });

  // `length` (the output limit) and `content_filter` end a reply before its end: OpenAI's Responses API
  // calls such an answer incomplete. Only the reason it ends with counts: text after one goes on.
  it.each([
    ['length', true],
    ['content_filter', true],
    ['stop', false],
    ['tool_calls', false],
  ])('says a reply that ends with finish_reason %s is cut short: %s (JSON and streamed)', async (finishReason, cutShort) => {
    fake.enqueue({ finishReason });
    expect(await adapter().complete(chat())).toMatchObject({ content: 'Echo: Hello there', cutShort });
    fake.enqueue({ finishReason });
    const { events, error } = await drain(adapter(), chat());
    expect(error).toBeUndefined();
    expect(events.at(-1)).toMatchObject({ type: 'done', cutShort });
  });

  it('takes the finish_reason a stream ends with, not one that more text followed', async () => {
    const script = async (res: ServerResponse) => {
      res.write(streamed({ index: 0, delta: { content: 'one ' }, finish_reason: 'length' }));
      res.write(streamed({ index: 0, delta: { content: 'two' } }));
      res.end(streamed({ index: 0, delta: {}, finish_reason: 'stop' }) + 'data: [DONE]\n\n');
    };
    const whole = await withScriptedStream(script, (baseURL) => drain(adapter({ baseURL }), chat()));
    expect(whole.events.at(-1)).toMatchObject({ type: 'done', cutShort: false });
    const cut = async (res: ServerResponse) => {
      res.write(streamed({ index: 0, delta: { content: 'one ' }, finish_reason: 'stop' }));
      res.end(streamed({ index: 0, delta: { content: 'two' }, finish_reason: 'length' }) + 'data: [DONE]\n\n');
    };
    const { events } = await withScriptedStream(cut, (baseURL) => drain(adapter({ baseURL }), chat()));
    expect(deltas(events)).toEqual(['one ', 'two']);
    expect(events.at(-1)).toMatchObject({ type: 'done', cutShort: true });
  });

  // Open WebUI puts a finish_reason on its reasoning chunks, some proxies on every chunk: the text that
  // follows it is the answer's, however long after it comes. It was cut 1 s after one (more than 1 s
  // apart, as a local model's may be), and stored as complete.
  it('reads on past a finish_reason that more text follows, however long after', async () => {
    const script = async (res: ServerResponse) => {
      res.write(streamed({ index: 0, delta: { reasoning_content: 'Thinking.' }, finish_reason: 'stop' }));
      for (const word of ['one ', 'two ', 'three']) {
        await new Promise((resolve) => setTimeout(resolve, 1_300));
        res.write(streamed({ index: 0, delta: { content: word }, finish_reason: 'stop' }));
      }
      res.end('data: [DONE]\n\n');
    };
    const { events, error } = await withScriptedStream(script, (baseURL) => drain(adapter({ baseURL }), chat()));
    expect(error).toBeUndefined();
    expect(deltas(events)).toEqual(['one ', 'two ', 'three']);
    expect(events.at(-1)).toMatchObject({ type: 'done' });
  });

  // Whole by its finish_reason, as when the upstream then ends the response without [DONE], or leaves it open.
  it('ends with done when the connection is reset after the finish_reason', async () => {
    const script = async (res: ServerResponse) => {
      res.write(streamed({ index: 0, delta: { content: 'whole' } }));
      res.write(streamed({ index: 0, delta: {}, finish_reason: 'stop' }));
      await new Promise((resolve) => setTimeout(resolve, 50));
      res.socket?.destroy();
    };
    const { events, error } = await withScriptedStream(script, (baseURL) => drain(adapter({ baseURL }), chat()));
    expect(error).toBeUndefined();
    expect(events).toEqual([
      { type: 'delta', content: 'whole' },
      { type: 'done', model: 'local-model', usage: null, cutShort: false },
    ]);
  });

  it('holds the rest of the reply back while the sink takes a delta, then gives it in order', async () => {
    const given: string[] = [];
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const ended = withScriptedStream(wholeReplyAtOnce, (baseURL) =>
      adapter({ baseURL }).stream(chat(), (content) => {
        given.push(content);
        return content === 'one ' ? held : undefined;
      }),
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(given).toEqual(['one ']);
    release();
    expect(await ended).toEqual({ model: 'local-model', usage: null, cutShort: false });
    expect(given).toEqual(['one ', 'two ', 'three']);
  });

  it('gives nothing more once the call is aborted, though the rest of the reply has arrived with the delta', async () => {
    const client = new AbortController();
    const clientGone = new Error('client went away');
    const given: string[] = [];
    const error = await withScriptedStream(wholeReplyAtOnce, (baseURL) =>
      rejection(
        adapter({ baseURL }).stream(chat(10_000, { signal: client.signal }), (content) => {
          given.push(content);
          client.abort(clientGone);
        }),
      ),
    );
    expect(given).toEqual(['one ']);
    expect(error).toBe(clientGone);
  });

  it('holds the upstream back while the sink holds the reply, past what the reader keeps', async () => {
    const chunks = 400;
    fake.enqueue({ content: 'x'.repeat(chunks * 64 * 1024), chunks });
    let given = 0;
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const ended = adapter({ maxResponseBytes: 64 * 1024 * 1024 }).stream(chat(), () => {
      given++;
      return given === 1 ? held : undefined;
    });
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    // What the sockets hold on both sides, and 64 KB in the reader: 25 MB more if nothing held it back.
    expect(fake.requests[0]!.chunksSent).toBeLessThan(chunks / 2);
    release();
    await ended;
    expect(given).toBe(chunks);
  });

  it('ends the call with the failure of its sink, and closes the upstream connection', async () => {
    fake.enqueue({ content: 'one two three four', chunkDelayMs: 200 });
    const given: string[] = [];
    const refused = new Error('the client is gone');
    const error = await rejection(
      adapter().stream(chat(), (content) => {
        given.push(content);
        return Promise.reject(refused);
      }),
    );
    expect(given).toEqual(['one ']);
    expect(error).toBeInstanceOf(ProviderError);
    expect((error as Error).cause).toBe(refused);
    await fake.waitForClientClose();
    expect(fake.requests[0]!.chunksSent).toBeLessThan(4);
  });
});

describe('files', () => {
  const directory = mkdtempSync(join(tmpdir(), 'provider-files-'));
  const path = join(directory, 'stored-under-an-id');
  writeFileSync(path, 'name,score\nada,10\n');
  const file = { filename: 'scores.csv', mimeType: 'text/csv', path };

  it('uploads a file from disk with purpose user_data, then deletes it', async () => {
    const files = adapter();
    const { providerFileId } = await files.uploadFile(file, within(10_000));
    const stored = fake.files.get(providerFileId);
    expect(stored).toMatchObject({ filename: 'scores.csv', purpose: 'user_data' });
    expect(stored!.mimeType).toMatch(/^text\/csv/);
    expect(stored!.bytes.toString()).toBe('name,score\nada,10\n');
    expect(fake.requests[0]!.headers.authorization).toBe(`Bearer ${API_KEY}`);

    await files.deleteFile(providerFileId, within(10_000));
    expect(fake.files.size).toBe(0);
    expect(fake.requests[1]).toMatchObject({ method: 'DELETE', path: `/v1/files/${providerFileId}` });
  });

  it('takes a file already gone upstream as deleted', async () => {
    await expect(adapter().deleteFile('file-unknown', within(10_000))).resolves.toBeUndefined();
  });

  it('tells a deletion refused for good (400, 422) from one a later try may pass (401, 403, 408, 429, 5xx)', async () => {
    for (const [status, refusedForGood] of [[400, true], [422, true], [403, false], [401, false], [408, false], [429, false], [500, false]] as const) {
      fake.setDefault({ status });
      const error = await rejection(adapter({ maxRetries: 0 }).deleteFile('file-kept', within(10_000)));
      expect(error instanceof ProviderRefusedDeletion, String(status)).toBe(refusedForGood);
      expect(clientVisible(error)).not.toContain('LEAK');
    }
  });

  it('retries a failing upload, then maps it to ProviderError without upstream text', async () => {
    fake.setDefault({ status: 500 });
    const error = await rejection(adapter({ maxRetries: 1 }).uploadFile(file, within(10_000)));
    expect(error).toBeInstanceOf(ProviderError);
    expect(clientVisible(error)).not.toContain('LEAK');
    expect(fake.requests).toHaveLength(2);
    expect(fake.files.size).toBe(0);
  });
});
