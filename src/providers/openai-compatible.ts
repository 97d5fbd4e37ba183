import { constants, createReadStream } from 'node:fs';
import { access } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import OpenAI, { APIConnectionError, APIError, NotFoundError, toStreamingFile } from 'openai';
import { ApiError } from '../http/errors.js';
import { followAbort } from './abort.js';
import { backoffMs, retryAfterMs } from './retry.js';
import {
  type ChatCompletion,
  type ChatMessage,
  type ChatRequest,
  type ProviderAdapter,
  ProviderError,
  type ProviderName,
  ProviderRateLimited,
  ProviderTimeout,
  type StreamEvent,
  type UploadedFile,
  type Usage,
} from './types.js';

export interface OpenAICompatibleOptions {
  name: ProviderName;
  apiKey: string;
  /** Including the version path, e.g. `https://api.openai.com/v1`. */
  baseURL: string;
  defaultHeaders?: Record<string, string>;
  supportsFiles: boolean;
  /** Retries after the first attempt on upstream 408/429/5xx and connection failures (AI_MAX_RETRIES). */
  maxRetries: number;
  /** The most bytes of one upstream response body (a reply, a stream, an error); by default room for 1,024 tokens. */
  maxResponseBytes?: number;
}

/**
 * Room for a reply of `maxOutputTokens` tokens in any form an upstream sends it (a stream spends a few
 * hundred bytes of JSON on each token) and for any error body: a response larger than that is not a reply.
 */
export function maxResponseBytesFor(maxOutputTokens: number): number {
  return 1024 * 1024 + 1024 * maxOutputTokens;
}

// The SDK's timeout is per attempt and knows nothing of the request's deadline, which the caller's
// signal enforces; it only has to outlast any deadline (and stay below setTimeout's 2^31 ms limit).
const SDK_TIMEOUT_MS = 24 * 60 * 60 * 1000;

type CallBounds = Pick<ChatRequest, 'signal' | 'deadline'>;

/**
 * OpenAI's chat completions API as OpenAI, OpenRouter and local servers (Ollama, vLLM, llama.cpp)
 * speak it. Retries are ours, not the SDK's: its Retry-After wait has no upper bound and its timeout
 * is per attempt, while every wait here ends with the caller's signal.
 */
export class OpenAICompatibleAdapter implements ProviderAdapter {
  readonly name: ProviderName;
  readonly supportsFiles: boolean;
  private readonly client: OpenAI;
  private readonly maxRetries: number;

  constructor(options: OpenAICompatibleOptions) {
    this.name = options.name;
    this.supportsFiles = options.supportsFiles;
    this.maxRetries = options.maxRetries;
    this.client = new OpenAI({
      apiKey: options.apiKey,
      baseURL: options.baseURL,
      defaultHeaders: options.defaultHeaders,
      maxRetries: 0,
      timeout: SDK_TIMEOUT_MS,
      // Left unset, the SDK reads OPENAI_ORG_ID and OPENAI_PROJECT_ID and sends them to every provider.
      organization: null,
      project: null,
      // Failures surface as our errors, logged with their request; the SDK would print upstream bodies to the console.
      logLevel: 'off',
      fetch: guardedFetch(options.maxResponseBytes ?? maxResponseBytesFor(1024)),
    });
  }

  async complete(request: ChatRequest): Promise<ChatCompletion> {
    const { signal } = request;
    const body: unknown = await withSdkSignal(signal, (sdkSignal) =>
      this.withRetries(request, () => this.client.chat.completions.create(chatBody(request), { signal: sdkSignal })),
    );
    // The SDK's types promise a ChatCompletion; an upstream may still send anything with a 200.
    const completion = body as Partial<OpenAI.ChatCompletion> | null;
    const content = completion?.choices?.[0]?.message?.content;
    if (typeof content !== 'string') throw failure(new Error('reply without choices[0].message.content'), signal);
    return { content, model: upstreamModel(completion?.model, request.model), usage: readUsage(completion?.usage) };
  }

  /**
   * Deltas as each upstream chunk arrives. Only opening the stream is retried: once deltas have been
   * yielded, a broken stream throws ProviderError and the caller keeps the text so far.
   */
  async *stream(request: ChatRequest): AsyncGenerator<StreamEvent> {
    const { signal } = request;
    const sdk = followSignal(signal);
    try {
      const chunks = await this.withRetries(request, () =>
        this.client.chat.completions.create(
          { ...chatBody(request), stream: true, stream_options: { include_usage: true } },
          { signal: sdk.signal },
        ),
      );
      let model = request.model;
      let usage: Usage | null = null;
      let finished = false;
      try {
        for await (const chunk of chunks) {
          if (typeof chunk !== 'object' || chunk === null) throw new Error('stream chunk is not an object');
          model = upstreamModel(chunk.model, model);
          // Servers that ignore stream_options send no usage chunk: usage stays null.
          usage = readUsage(chunk.usage) ?? usage;
          const choice = chunk.choices?.[0];
          const content = choice?.delta?.content;
          if (typeof content === 'string' && content !== '') yield { type: 'delta', content };
          if (choice?.finish_reason) finished = true;
        }
      } catch (error) {
        throw failure(error, signal);
      }
      // The SDK ends the iteration quietly when the signal aborts it, and so does an upstream that closes
      // the stream cleanly half-way: only a finish_reason says the reply is whole.
      if (!finished) throw failure(new Error('stream ended without a finish_reason'), signal);
      yield { type: 'done', model, usage };
    } finally {
      sdk.release();
    }
  }

  async uploadFile(file: { filename: string; mimeType: string; path: string }, signal: AbortSignal): Promise<UploadedFile> {
    // A file that cannot be read is ours to report, not the provider's.
    await access(file.path, constants.R_OK);
    // Streamed from disk, afresh for each attempt: a file of any size never sits in memory whole.
    const created: unknown = await withSdkSignal(signal, (sdkSignal) =>
      this.withRetries({ signal }, () => {
        const upload = toStreamingFile(createReadStream(file.path), file.filename, { type: file.mimeType });
        return this.client.files.create({ file: upload, purpose: 'user_data' }, { signal: sdkSignal });
      }),
    );
    const id = (created as { id?: unknown } | null)?.id;
    if (typeof id !== 'string' || id === '') throw failure(new Error('file upload answered without an id'), signal);
    return { providerFileId: id };
  }

  async deleteFile(providerFileId: string, signal: AbortSignal): Promise<void> {
    await withSdkSignal(signal, (sdkSignal) =>
      this.withRetries({ signal }, async () => {
        try {
          await this.client.files.delete(providerFileId, { signal: sdkSignal });
        } catch (error) {
          // Already gone upstream is what deleting wanted.
          if (!(error instanceof NotFoundError)) throw error;
        }
      }),
    );
  }

  /**
   * One attempt plus up to maxRetries retries of the transient failures, each after a wait (the
   * upstream's Retry-After, else backoff). A wait that would end past the deadline is not started: the
   * last failure is thrown at once. Throws only provider errors, or the signal's reason (see failure).
   */
  private async withRetries<T>(bounds: CallBounds, attempt: () => Promise<T>): Promise<T> {
    const { signal, deadline = Number.POSITIVE_INFINITY } = bounds;
    for (let retry = 0; ; retry++) {
      try {
        return await attempt();
      } catch (error) {
        const wait = retry < this.maxRetries && !signal.aborted ? retryWait(error, retry) : undefined;
        if (wait === undefined || Date.now() + wait >= deadline) throw failure(error, signal);
        await sleep(wait, undefined, { signal }).catch((abort: unknown) => {
          throw failure(abort, signal);
        });
      }
    }
  }
}

/**
 * A signal for the SDK that follows `signal` until released. The SDK adds an abort listener to the
 * signal it is given and never removes it, and Node keeps a timeout or combined (`AbortSignal.any`)
 * signal alive while it has a listener and has not fired: handed the caller's signal, every call would
 * stay in memory, the SDK's request state with it, until its deadline, and a stream's for good.
 */
function followSignal(signal: AbortSignal): { signal: AbortSignal; release(): void } {
  const controller = new AbortController();
  return { signal: controller.signal, release: followAbort(controller, signal) };
}

/**
 * The SDK's fetch, with two bounds no upstream can lift. A redirect is never followed: it would carry
 * the conversation (and, to the same origin, the API key) wherever the upstream points; it is answered
 * like any other response that is not a 2xx. A body past `maxBytes` fails as it is read, and its
 * connection is closed: the SDK reads a JSON reply whole into memory, and a reply is stored whole.
 */
function guardedFetch(maxBytes: number): typeof fetch {
  return async (input, init) => {
    const response = await fetch(input, { ...init, redirect: 'manual' });
    if (!response.body) return response;
    // A declared length within the bound bounds the body already (fetch reads no byte past it): such a
    // response (a JSON reply, as a rule) is passed on as it is, without a stream around its body.
    const declared = response.headers.get('content-length');
    if (declared !== null && Number(declared) <= maxBytes) return response;
    return new Response(boundedBody(response.body.getReader(), maxBytes), {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  };
}

/**
 * The body read through `reader`, one chunk per read, failing past `maxBytes` and then closing the
 * connection. A pull source, not a TransformStream: a stream held open for minutes keeps one stream
 * and a reader, not a second stream, a writable and a pipe with their promises (measured with 1,000
 * open chat streams: about 4 KB of heap each instead of 11, and fewer promises for each chunk).
 */
function boundedBody(reader: ReadableStreamDefaultReader<Uint8Array>, maxBytes: number): ReadableStream<Uint8Array> {
  let received = 0;
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) return controller.close();
        received += value.byteLength;
        if (received <= maxBytes) return controller.enqueue(value);
        const error = new Error(`upstream response over ${maxBytes} bytes`);
        controller.error(error);
        await reader.cancel(error);
      },
      cancel: (reason) => reader.cancel(reason),
    },
    // Nothing is read ahead of the SDK: each read pulls one chunk from the connection.
    { highWaterMark: 0 },
  );
}

/** Runs `call` with a signal for the SDK that follows `signal` only while `call` runs. */
async function withSdkSignal<T>(signal: AbortSignal, call: (sdkSignal: AbortSignal) => Promise<T>): Promise<T> {
  const sdk = followSignal(signal);
  try {
    return await call(sdk.signal);
  } finally {
    sdk.release();
  }
}

/** Only the fields of the wire format: callers may hand over richer objects, such as stored rows. */
function chatBody(request: ChatRequest) {
  return {
    model: request.model,
    messages: request.messages.map(wireMessage),
    // Not max_completion_tokens: OpenAI-compatible servers (and older OpenAI models) know only max_tokens.
    max_tokens: request.maxOutputTokens,
  };
}

/** A message as the API takes it; provider files go first, as file content parts of a user message. */
function wireMessage({ role, content, fileIds }: ChatMessage): OpenAI.ChatCompletionMessageParam {
  if (role !== 'user' || !fileIds?.length) return { role, content };
  const files = fileIds.map((id) => ({ type: 'file' as const, file: { file_id: id } }));
  return { role, content: [...files, { type: 'text', text: content }] };
}

/** How long to wait before retrying after `error`, or undefined when retrying cannot help. */
function retryWait(error: unknown, retry: number): number | undefined {
  const transient =
    error instanceof APIConnectionError || // refused, reset or timed out before a response
    (error instanceof APIError && error.status !== undefined && (error.status === 408 || error.status === 429 || error.status >= 500));
  if (!transient) return undefined;
  return retryAfterMs(error.headers) ?? backoffMs(retry);
}

/**
 * What a failed call throws. When the signal fired: ProviderTimeout if its reason is a TimeoutError
 * (the deadline, from AbortSignal.timeout), else the reason itself (a client that left) for the caller
 * to recognise. Otherwise a provider error whose message is generic: upstream error text can carry
 * account details and reaches clients through the problem body, so it stays on `cause`, for logs.
 */
function failure(error: unknown, signal: AbortSignal): unknown {
  if (signal.aborted) {
    const reason: unknown = signal.reason;
    return (reason as { name?: unknown } | null | undefined)?.name === 'TimeoutError' ? new ProviderTimeout() : reason;
  }
  if (error instanceof ApiError) return error;
  const mapped =
    error instanceof APIError && error.status === 429
      ? new ProviderRateLimited(Math.max(1, Math.ceil((retryAfterMs(error.headers) ?? 1000) / 1000)))
      : new ProviderError();
  mapped.cause = error;
  return mapped;
}

function upstreamModel(model: unknown, fallback: string): string {
  return typeof model === 'string' && model !== '' ? model : fallback;
}

function readUsage(usage: unknown): Usage | null {
  const { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total } = (usage ?? {}) as Partial<OpenAI.CompletionUsage>;
  if (typeof prompt !== 'number' || typeof completion !== 'number') return null;
  return { promptTokens: prompt, completionTokens: completion, totalTokens: typeof total === 'number' ? total : prompt + completion };
}
