import { openAsBlob } from 'node:fs';
import { finished, type Readable } from 'node:stream';
import { StringDecoder } from 'node:string_decoder';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Dispatcher, FormData, Pool } from 'undici';
import { ApiError } from '../http/errors.js';
import { withFields } from '../with-fields.js';
import { backoffMs, retryAfterMs } from './retry.js';
import { type SseEvent, SseDecoder } from './sse-decoder.js';
import { messagesWire } from './wire-messages.js';
import {
  type CallBounds,
  type ChatCompletion,
  type ChatRequest,
  type DeltaSink,
  EmptyAnswer,
  type ProviderAdapter,
  ProviderError,
  type ProviderName,
  ProviderRateLimited,
  ProviderRefusedDeletion,
  type RetryListener,
  ProviderTimeout,
  type ReplyEnd,
  type UploadedFile,
  type Usage,
} from './types.js';

export interface OpenAICompatibleOptions {
  name: ProviderName;
  /** Sent as a bearer token; a local server may need none, and gets no Authorization header. */
  apiKey: string | undefined;
  /** Including the version path, e.g. `https://api.openai.com/v1`. */
  baseURL: string;
  defaultHeaders?: Record<string, string>;
  supportsFiles: boolean;
  /** Retries after the first attempt on upstream 408/429/5xx and connection failures (AI_MAX_RETRIES). */
  maxRetries: number;
  /** Told of each retry before its wait: a call that succeeds at its second try says nothing else of the first. */
  onRetry?: RetryListener;
  /** The most bytes of one upstream response body (a reply, a stream, an error); by default room for 1,024 tokens. */
  maxResponseBytes?: number;
  /**
   * The request field that bounds the reply. `max_tokens` by default: OpenAI-compatible servers know it.
   * OpenAI's own API deprecated it for `max_completion_tokens`, and refuses it (400) for its reasoning
   * models (o1, o3, o4-mini, gpt-5…), where `max_completion_tokens` works with every chat model.
   */
  outputLimitField?: OutputLimitField;
}

export type OutputLimitField = 'max_tokens' | 'max_completion_tokens';

/**
 * Room for a reply of `maxOutputTokens` tokens in any form an upstream sends it (a stream spends a few
 * hundred bytes of JSON on each token) and for any error body: a response larger than that is not a reply.
 */
export function maxResponseBytesFor(maxOutputTokens: number): number {
  return 1024 * 1024 + 1024 * maxOutputTokens;
}

type ResponseHeaders = Record<string, string | string[] | undefined>;

/** An answer that is not a 2xx, a redirect included. The start of its body is kept for logs, never for clients. */
class UpstreamStatusError extends Error {
  /**
   * A 429 that says the account has no quota left (OpenAI's `insufficient_quota`: its billing, not its
   * rate): no wait makes it pass, so it is neither retried nor answered as a rate limit to wait out.
   */
  readonly outOfQuota: boolean;

  /** The upstream says the request is longer than the model's context (see `saysContextTooLong`). */
  readonly contextTooLong: boolean;

  /** The upstream says it has no such model (see `saysNoSuchModel`). */
  readonly noSuchModel: boolean;

  constructor(
    readonly status: number,
    readonly headers: ResponseHeaders,
    body: string,
    /** The key the call was made with: a proxy may quote it back ("Invalid key Bearer sk-…"), and the message is logged. */
    key: string | undefined,
  ) {
    super(`upstream answered ${status}${upstreamRequestId(headers)}: ${quoted(body, key)}`);
    const error = errorOf(body);
    this.outOfQuota = status === 429 && (error.code ?? error.type) === 'insufficient_quota';
    this.contextTooLong = status === 400 && saysContextTooLong(error);
    this.noSuchModel = (status === 400 || status === 404) && saysNoSuchModel(error);
  }
}

/** The upstream's own name of a request that failed (OpenAI's `x-request-id`): what its support asks for. */
function upstreamRequestId(headers: ResponseHeaders): string {
  const id = headers['x-request-id'];
  return typeof id === 'string' && /^[\x21-\x7e]{1,200}$/.test(id) ? ` (upstream request id ${id})` : '';
}

interface ErrorBody {
  code?: unknown;
  type?: unknown;
  message?: unknown;
}

/** An upstream's text as a log may hold it: without the key it may quote back ("Invalid key Bearer sk-…"), and not all of it. */
const quoted = (text: string, key: string | undefined) => (key ? text.replaceAll(key, '[redacted]') : text).slice(0, 1_000);

/** The error of an OpenAI-style error body (see `errorIn`); an empty one for a body that is not JSON. */
function errorOf(body: string): ErrorBody {
  try {
    return errorIn(JSON.parse(body)) ?? {};
  } catch {
    return {};
  }
}

/**
 * The error a parsed body (or a chunk of a stream) describes, if it is one: under `error` (OpenAI,
 * OpenRouter, llama.cpp; a bare string there is its message), or the body itself (vLLM's `{object: "error"}`).
 */
function errorIn(parsed: unknown): ErrorBody | undefined {
  const { error, object } = (parsed ?? {}) as { error?: unknown; object?: unknown };
  if (typeof error === 'object' && error !== null) return error as ErrorBody;
  if (error) return { message: error };
  return object === 'error' ? (parsed as ErrorBody) : undefined;
}

/**
 * An error an upstream sends in a 200 (`error`, of `text`), as its body or as a chunk of its stream:
 * OpenRouter's, whose `code` is the status it stands for (a 429 of the model's provider, a 502), is
 * failed as that status would be (a 429 retried, then PROVIDER_RATE_LIMITED); one without a status, or
 * one after text was given (`midStream`: a stream under way breaks, whatever it names), as a malformed
 * answer. Its text goes to the log either way.
 */
function inBandError({ code }: ErrorBody, text: string, key: string | undefined, headers: ResponseHeaders, midStream = false): Error {
  if (!midStream && typeof code === 'number' && code >= 400 && code <= 599) return new UpstreamStatusError(code, headers, text, key);
  return new Error(`the upstream sent an error${upstreamRequestId(headers)}: ${quoted(text, key)}`);
}

/** The words of a context overflow where no code names it: OpenRouter's code is the HTTP status, vLLM's too. */
const CONTEXT_OVERFLOW = /maximum context length|context (length|window|size)|prompt is too long|too many tokens/i;

/**
 * Whether a 400's error says the request is longer than the model's context: OpenAI's code
 * `context_length_exceeded`, llama.cpp's type `exceed_context_size_error`, or in its message ("This
 * model's maximum context length is 4096 tokens", from vLLM, and OpenRouter's for the model behind it).
 */
function saysContextTooLong({ code, type, message }: ErrorBody): boolean {
  if (code === 'context_length_exceeded' || type === 'exceed_context_size_error') return true;
  return typeof message === 'string' && CONTEXT_OVERFLOW.test(message);
}

// The gap bounded: with `.*`, each "model" of a long error (one listing the models there are) scanned to
// its end, quadratic in a body of up to megabytes.
const NO_SUCH_MODEL = /\bmodel\b.{0,200}?\b(?:not found|does not exist)|not a valid model/i;

/**
 * Whether a 400's or a 404's error says the model named is not one the upstream has: OpenAI's code
 * `model_not_found`, or in its message (Ollama's `model "x" not found, try pulling it first`, vLLM's
 * "The model `x` does not exist.", OpenRouter's "x is not a valid model ID").
 */
function saysNoSuchModel({ code, message }: ErrorBody): boolean {
  return code === 'model_not_found' || (typeof message === 'string' && NO_SUCH_MODEL.test(message.slice(0, 2_000)));
}

/**
 * No answer, or none whole: the connection refused, or reset or closed before a status line, or (after
 * one) before anything of the answer was used: a JSON body cut off, a stream before its first delta.
 */
class UpstreamUnreachable extends Error {}

/**
 * OpenAI's chat completions and Files APIs as OpenAI, OpenRouter and local servers (Ollama, vLLM,
 * llama.cpp) speak them, over undici's request API with a pool of keep-alive connections. Not the
 * official SDK: on the chat path its fetch, WHATWG streams and per-call objects cost about a fifth of
 * a chat's CPU and a large share of each open stream's memory (figures 4 and 6 of the benchmarks). Retries are ours,
 * and every wait ends with the caller's signal. Two bounds no upstream can lift: a redirect is never
 * followed (it would carry the conversation, and the key, wherever the upstream points) and is answered
 * like any other status that is not a 2xx; a body past `maxResponseBytes` fails as it is read.
 */
export class OpenAICompatibleAdapter implements ProviderAdapter {
  readonly name: ProviderName;
  readonly supportsFiles: boolean;
  readonly baseURL: string;
  private readonly maxRetries: number;
  private readonly onRetry: RetryListener | undefined;
  private readonly pool: Pool;
  /** The base URL's path, without a trailing slash: each API's path goes after it. */
  private readonly basePath: string;
  private readonly apiKey: string | undefined;
  private readonly headers: Record<string, string>;
  private readonly jsonHeaders: Record<string, string>;
  private readonly outputLimitField: OutputLimitField;

  constructor(options: OpenAICompatibleOptions) {
    this.name = options.name;
    this.supportsFiles = options.supportsFiles;
    this.maxRetries = options.maxRetries;
    this.onRetry = options.onRetry;
    this.outputLimitField = options.outputLimitField ?? 'max_tokens';
    this.baseURL = options.baseURL;
    const base = new URL(options.baseURL);
    this.basePath = base.pathname.replace(/\/+$/, '');
    this.pool = new Pool(base.origin, {
      // Only the caller's signal ends a call (the chat's deadline, a client that left): undici's own
      // 300 s limits would cut a stream that the chat still allows.
      headersTimeout: 0,
      bodyTimeout: 0,
      maxResponseSize: options.maxResponseBytes ?? maxResponseBytesFor(1024),
    });
    this.apiKey = options.apiKey;
    // Answers are read as sent, never decompressed: a request that names no coding takes any (RFC 9110
    // §12.5.3), and a proxy that then gzipped one had it fail as malformed JSON.
    this.headers = {
      ...options.defaultHeaders,
      'accept-encoding': 'identity',
      ...(options.apiKey && { authorization: `Bearer ${options.apiKey}` }),
    };
    this.jsonHeaders = { ...this.headers, 'content-type': 'application/json' };
  }

  /** Closes the connections once the requests in flight are answered; no request may follow. */
  close(): Promise<void> {
    return this.pool.close();
  }

  async complete(request: ChatRequest): Promise<ChatCompletion> {
    const { signal } = request;
    const completion = (await this.withRetries(request, async () => {
      const response = await this.send('POST', '/chat/completions', chatBody(request, false, this.outputLimitField), signal);
      const body: unknown = await response.body.json().catch(readFailure);
      const error = errorIn(body);
      if (error) throw inBandError(error, JSON.stringify(body), this.apiKey, response.headers);
      return body;
    })) as { choices?: { message?: { content?: unknown; refusal?: unknown }; finish_reason?: unknown }[]; model?: unknown; usage?: unknown } | null;
    // An upstream may send anything with a 200.
    const choice = completion?.choices?.[0];
    const content = answerText(choice?.message);
    if (typeof content !== 'string') throw failure(new Error('reply without choices[0].message.content'), signal);
    if (content === '') throw new EmptyAnswer(readUsage(completion?.usage));
    return {
      content: storable(content),
      model: upstreamModel(completion?.model, request.model),
      usage: readUsage(completion?.usage),
      cutShort: cutShort(choice?.finish_reason),
    };
  }

  /**
   * Gives the reply's text to `onDelta` a delta at a time as its chunks arrive, and resolves with how it
   * ended. Retried up to the first delta (a connection lost after the headers too: nothing of the answer
   * was passed on yet); once a delta has been given, a broken stream fails with ProviderError and the
   * caller keeps the text so far. Pushed to the caller, not pulled by it: see `ReplyReader`.
   */
  stream(request: ChatRequest, onDelta: DeltaSink): Promise<ReplyEnd> {
    const { signal } = request;
    return this.withRetries(request, async () => {
      const response = await this.send('POST', '/chat/completions', chatBody(request, true, this.outputLimitField), signal);
      return new Promise<ReplyEnd>((resolve, reject) => {
        new ReplyReader(response, request, this.apiKey, onDelta, resolve, (error, given) => reject(given ? failure(error, signal) : error));
      }).catch(readFailure);
    });
  }

  async uploadFile(file: { filename: string; mimeType: string; path: string }, bounds: CallBounds): Promise<UploadedFile> {
    const { signal } = bounds;
    // A file that cannot be read is ours to report, not the provider's. Read from disk as it is sent,
    // afresh for each attempt: a file of any size never sits in memory whole.
    const blob = await openAsBlob(file.path, { type: file.mimeType });
    const created = await this.withRetries(bounds, async () => {
      const form = new FormData();
      form.set('purpose', 'user_data');
      form.set('file', blob, file.filename);
      const response = await this.send('POST', '/files', form, signal);
      return response.body.json().catch(readFailure);
    });
    const id = (created as { id?: unknown } | null)?.id;
    if (typeof id !== 'string' || id === '') throw failure(new Error('file upload answered without an id'), signal);
    return { providerFileId: id };
  }

  async deleteFile(providerFileId: string, bounds: CallBounds): Promise<void> {
    const { signal } = bounds;
    await this.withRetries(bounds, async () => {
      try {
        const response = await this.send('DELETE', `/files/${encodeURIComponent(providerFileId)}`, undefined, signal);
        await response.body.dump();
      } catch (error) {
        if (!(error instanceof UpstreamStatusError)) throw error;
        // Already gone upstream is what deleting wanted.
        if (error.status === 404) return;
        throw refusedForGood(error.status) ? new ProviderRefusedDeletion(error.status) : error;
      }
    });
  }

  /**
   * One request, answered with a 2xx whose body the caller reads (or destroys). The caller's signal is
   * handed to undici, which lets go of it when the body closes. Any other status throws
   * UpstreamStatusError once its body is read; no answer at all throws UpstreamUnreachable. JSON is
   * made for each attempt and handed over as it is written: undici keeps a request's body until the
   * answer ends, which for a stream is as long as it streams, and a long history's is hundreds of KB.
   */
  private async send(method: 'POST' | 'DELETE', path: string, body: Uint8Array[] | FormData | undefined, signal: AbortSignal): Promise<Dispatcher.ResponseData> {
    let response: Dispatcher.ResponseData;
    try {
      const sent = Array.isArray(body)
        ? { headers: withFields(this.jsonHeaders, { 'content-length': String(body.reduce((sum, chunk) => sum + chunk.length, 0)) }), body: new HandedOver(body) as unknown as Readable }
        : { headers: this.headers, body };
      response = await this.pool.request({ method, path: this.basePath + path, ...sent, signal });
    } catch (error) {
      throw new UpstreamUnreachable('the upstream did not answer', { cause: error });
    }
    if (response.statusCode >= 200 && response.statusCode < 300) return response;
    const text = await response.body.text().catch(() => '');
    throw new UpstreamStatusError(response.statusCode, response.headers, text, this.apiKey);
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
        this.onRetry?.({ provider: this.name, reason: upstreamFailure(error), retry: retry + 1, waitMs: wait }, bounds.log);
        await sleep(wait, undefined, { signal }).catch((abort: unknown) => {
          throw failure(abort, signal);
        });
      }
    }
  }
}

/**
 * A chat stream's body read as its chunks arrive, each delta given to the caller's sink at once. Pushed,
 * not pulled through an iterator: an open stream waits for its next delta for as long as the upstream
 * takes, and a pulling consumer leaves a promise chain waiting meanwhile (its call, the body's, the
 * caller's await), made afresh for each delta. Those outlive the young generation and are promoted as
 * garbage: with 5,000 streams open (benchmark figure 6), about a kilobyte a delta, 11 MB/s, that only a
 * full collection takes back. Here a stream waits with nothing of its own in flight.
 *
 * A failure is handed over with whether a delta was given before it, for the caller's retries (see
 * `stream`). At [DONE] the body is not destroyed: see `settle`.
 */
class ReplyReader {
  // A character split between two chunks is joined before the events are read.
  private readonly text = new StringDecoder('utf8');
  private readonly decoder = new SseDecoder();
  /** The events read and not given yet, from `nextEvent` on: the last chunk's, and behind a held delta those of the chunks since. */
  private events: SseEvent[] = [];
  private nextEvent = 0;
  private model: string;
  private usage: Usage | null = null;
  /** The last finish_reason read: the one the reply ended with (some servers put one on every chunk). */
  private finishReason: unknown;
  /**
   * A finish_reason was read and no text after it: the reply is whole. Text after one says it was not the
   * end (Open WebUI puts one on its reasoning chunks, some proxies on every chunk).
   */
  private finished = false;
  /** The last delta of text came with a finish_reason (as it does from servers that put one on every chunk). */
  private textFinishes = false;
  /**
   * The text is over, for sure: after text that came without one, a chunk of no text with a finish_reason
   * of its own, as OpenAI's last chunk is. (After text that came with one, such a chunk says nothing: a
   * server that puts one on every chunk may send a keep-alive of no text between deltas.)
   */
  private textOver = false;
  /** [DONE] was read. */
  private ended = false;
  /** How the body ended, once it has: null at its end, else what it failed with. */
  private bodyEnd: Error | null | undefined;
  // Once the reply is whole, what may follow (its usage, [DONE]) comes right behind it: a body that
  // then neither says [DONE] nor ends is closed after DRAIN_AFTER_DONE_MS of silence, and the reply is done.
  private afterFinish: NodeJS.Timeout | undefined;
  /** A delta was given: a failure from here on is one of the stream under way. */
  private given = false;
  /** The sink holds the reply back (its promise is pending): what arrives meanwhile waits in `events`. */
  private held = false;
  /** The bytes that arrived while the sink held the reply back. */
  private heldBytes = 0;
  private settled = false;
  private readonly unwatch: () => void;

  /** The call's: once it fires, nothing more is given, whatever has arrived (the client left, the deadline passed). */
  private readonly signal: AbortSignal;
  private readonly onProgress: (() => void) | undefined;
  private readonly body: Readable;
  /** The response's: an error sent in the stream is logged with the upstream's id of the request. */
  private readonly headers: ResponseHeaders;

  constructor(
    response: Dispatcher.ResponseData,
    request: ChatRequest,
    /** The key the call was made with, kept out of what is logged of an error the upstream sends. */
    private readonly key: string | undefined,
    private readonly onDelta: DeltaSink,
    private readonly resolve: (end: ReplyEnd) => void,
    private readonly reject: (error: unknown, given: boolean) => void,
  ) {
    const { body } = response;
    this.body = body;
    this.headers = response.headers;
    this.signal = request.signal;
    this.onProgress = request.onProgress;
    this.model = request.model;
    body.on('data', this.chunk);
    const unwatchBody = finished(body, { writable: false }, (error) => {
      this.bodyEnd = error ?? null;
      this.read();
    });
    this.signal.addEventListener('abort', this.aborted);
    this.unwatch = () => {
      unwatchBody();
      this.signal.removeEventListener('abort', this.aborted);
    };
  }

  /**
   * An abort while the sink holds the reply back fails it at once: waiting for the sink (a client that
   * takes nothing) would hold the turn, and what it stores, past the shutdown that interrupted it.
   */
  private readonly aborted = (): void => {
    if (this.held) this.fail(this.signal.reason);
  };

  private readonly chunk = (chunk: Buffer): void => {
    const events = this.decoder.push(this.text.write(chunk));
    // Behind a delta the sink holds, the events still to give come first.
    this.events = this.nextEvent < this.events.length ? this.events.slice(this.nextEvent).concat(events) : events;
    this.nextEvent = 0;
    if (!this.held) return this.read();
    // Kept here rather than left in the body, about as much as the body itself would buffer: a body
    // destroyed (its connection reset) may drop what it buffered, and the deltas that came before the
    // failure are the caller's. Past that the body is paused, which holds the upstream back.
    this.heldBytes += chunk.length;
    if (this.heldBytes >= HELD_BYTES_MAX) this.body.pause();
  };

  /** Gives what has arrived, up to the end of the reply, unless the sink holds it back. */
  private read(): void {
    try {
      while (!this.held && !this.settled) {
        // The body is destroyed on an abort, but what already arrived would still be given until it is. A
        // reply whose text is over, waiting for what may follow it (its usage, [DONE]), is whole however the
        // call ends now, with the usage read by then: a client that left before its `done`, say.
        if (this.signal.aborted) {
          if (this.textOver) return this.end();
          throw this.signal.reason;
        }
        if (this.nextEvent < this.events.length) this.readEvent(this.events[this.nextEvent++]!);
        else if (this.bodyEnd === undefined) return;
        // A whole reply stays whole when its connection is lost before [DONE], as when it is ended then.
        else if (this.bodyEnd && !this.finished) throw this.bodyEnd;
        else this.end();
      }
    } catch (error) {
      this.fail(error);
    }
  }

  private readEvent(event: SseEvent): void {
    if (event.data === '[DONE]') {
      this.ended = true;
      return this.end();
    }
    const data = streamChunk(event, this.key, this.headers, this.given);
    this.afterFinish?.refresh();
    this.model = upstreamModel(data.model, this.model);
    // Servers that ignore stream_options send no usage chunk: usage stays null.
    this.usage = readUsage(data.usage) ?? this.usage;
    const choice = Array.isArray(data.choices) ? (data.choices[0] as StreamChoice | null | undefined) : undefined;
    const content = answerText(choice?.delta);
    // Not a chunk of nothing (no choice, an empty delta): a gateway that sent those as keep-alives would
    // hold the turn open for ever.
    if (carriesSomething(choice?.delta)) this.onProgress?.();
    const finishes = Boolean(choice?.finish_reason);
    const text = typeof content === 'string' && content !== '';
    // Text after a finish_reason says it was not the end: the reason the reply ends with is a later one.
    if (text) this.unfinish();
    if (finishes) this.finishReason = choice!.finish_reason;
    if (!text) {
      // A chunk without text after a finish_reason (its own, or the last delta's: the usage chunk) ends
      // the text; not before any text (Open WebUI's reasoning chunks carry one).
      if (finishes || this.finished) this.finish(this.given);
      if (finishes && this.given && !this.textFinishes) this.textOver = true;
      return;
    }
    this.given = true;
    this.textFinishes = finishes;
    const taken = this.onDelta(storable(content), this.model);
    // A finish_reason that came with a delta says the reply is whole should the body end here, not that
    // it ends: some servers put one on every delta, however far apart (see `finish`).
    if (!taken) {
      if (finishes) this.finish(false);
      return;
    }
    this.held = true;
    this.heldBytes = 0;
    taken.then(
      () => {
        this.held = false;
        if (finishes) this.finish(false);
        this.read();
        if (!this.held && !this.settled && this.body.isPaused()) this.body.resume();
      },
      (error: unknown) => this.fail(error),
    );
  }

  /**
   * The reply is whole; with `drain`, once the text is over too (a finish_reason on a chunk of no text),
   * what may follow comes right behind it, and a body silent for DRAIN_AFTER_DONE_MS is closed. A
   * finish_reason on a delta drains nothing: a server that puts one on every delta, its deltas seconds
   * apart, had its reply cut after the first and stored as complete.
   */
  private finish(drain: boolean): void {
    this.finished = true;
    if (drain && !this.afterFinish) this.afterFinish = setTimeout(() => this.body.destroy(), DRAIN_AFTER_DONE_MS).unref();
  }

  private unfinish(): void {
    clearTimeout(this.afterFinish);
    this.afterFinish = undefined;
    this.finished = false;
    this.textOver = false;
    this.finishReason = undefined;
  }

  /** The end of the reply, once the body ended or said [DONE]. */
  private end(): void {
    // An upstream may close the stream cleanly half-way: only [DONE], the protocol's own end, or a
    // finish_reason says the reply is whole (some servers send [DONE] and no finish_reason).
    if (!this.finished && !this.ended) throw new Error('stream ended without a finish_reason');
    if (!this.given) throw new EmptyAnswer(this.usage);
    this.settle();
    this.resolve({ model: this.model, usage: this.usage, cutShort: cutShort(this.finishReason) });
  }

  private fail(error: unknown): void {
    if (this.settled) return;
    this.settle();
    this.reject(error, this.given);
  }

  /**
   * Lets go of the body. After [DONE] the rest of it (its end, as a rule) is read in the background,
   * which keeps the connection for the next call; the answer does not wait for it. A failure, the sink's
   * included, leaves the body unread: its connection is closed.
   */
  private settle(): void {
    this.settled = true;
    clearTimeout(this.afterFinish);
    this.body.off('data', this.chunk);
    this.unwatch();
    if (this.body.readableEnded) return;
    // The listeners are gone: an error the body emits from here on (undici's abort when it is
    // destroyed, among them) is nobody's to hear, and unheard it would end the process.
    this.body.on('error', () => {});
    if (this.ended) drainBriefly(this.body);
    else this.body.destroy();
  }
}

/**
 * What reading a 2xx answer's body failed with, for `withRetries`: its connection reset or closed
 * half-way is a connection failure, to be retried like one before the headers (the answer is lost
 * whole); anything else (a body that is no JSON, one too large) is the answer's own fault.
 */
function readFailure(error: unknown): never {
  if (brokeOff(error)) throw new UpstreamUnreachable('the upstream connection broke during its answer', { cause: error });
  throw error;
}

/** What reading an answer's body fails with when its connection is reset or closed half-way. */
function brokeOff(error: unknown): boolean {
  const { code } = (error ?? {}) as { code?: unknown };
  return code === 'UND_ERR_SOCKET' || code === 'ECONNRESET';
}

interface StreamChoice {
  delta?: { content?: unknown; refusal?: unknown; [field: string]: unknown } | null;
  finish_reason?: unknown;
}

/**
 * The text of an answer, or of a delta of one: its `content`, else OpenAI's `refusal`, which its models
 * send in place of content when they decline (content null): the model's answer all the same, and not a
 * provider failing.
 */
function answerText(message: { content?: unknown; refusal?: unknown } | null | undefined): unknown {
  const content = message?.content;
  return (typeof content !== 'string' || content === '') && typeof message?.refusal === 'string' ? message.refusal : content;
}

/**
 * Whether a finish_reason says the upstream stopped before the answer's end: at its output limit
 * (`length`: AI_MAX_OUTPUT_TOKENS, or the model's window) or by its content filter (`content_filter`),
 * as OpenAI's Responses API calls such an answer `incomplete`. Any other reason (`stop`, `tool_calls`, a
 * server's own) ends it whole.
 */
const cutShort = (finishReason: unknown): boolean => finishReason === 'length' || finishReason === 'content_filter';

/** The chunk an event carries; an error event, or a chunk naming an error, fails the stream (see `inBandError`). */
function streamChunk(event: SseEvent, key: string | undefined, headers: ResponseHeaders, midStream: boolean): { model?: unknown; usage?: unknown; choices?: unknown } {
  if (event.event === 'error') throw inBandError(errorOf(event.data), event.data, key, headers, midStream);
  const chunk: unknown = JSON.parse(event.data);
  if (typeof chunk !== 'object' || chunk === null) throw new Error('stream chunk is not an object');
  const error = errorIn(chunk);
  if (error) throw inBandError(error, event.data, key, headers, midStream);
  return chunk;
}

/**
 * Whether a delta holds anything of the answer or of the way to it: text, a refusal, a reasoning model's
 * thinking (`reasoning_content`, vLLM's and DeepSeek's; `reasoning`, OpenRouter's and Ollama's), a tool call.
 */
function carriesSomething(delta: Record<string, unknown> | null | undefined): boolean {
  if (!delta) return false;
  const { content, refusal, reasoning_content: thinking, reasoning, tool_calls: toolCalls } = delta;
  return [content, refusal, thinking, reasoning].some((text) => typeof text === 'string' && text !== '') || (Array.isArray(toolCalls) && toolCalls.length > 0);
}

const encoder = new TextEncoder();
const END = encoder.encode(']}');

/** Parts of a body smaller than this are joined with their neighbours: each chunk is a write of its own. */
const OWN_CHUNK_BYTES = 16 * 1024;

/**
 * The request body, as chunks to write in order: its fields, then the messages last, as `messagesWire`
 * keeps them. Not one JSON.stringify: a long history's messages are the same objects turn after turn,
 * and their bytes a view of those made for the turns before, written as they are. Joining them into one
 * buffer cost a long history's turn (629 KB) about a tenth of a millisecond, and a buffer of its size to
 * collect.
 */
function chatBody(request: ChatRequest, stream: boolean, outputLimitField: OutputLimitField): Uint8Array[] {
  const fields = {
    model: request.model,
    [outputLimitField]: request.maxOutputTokens,
    ...(stream && { stream: true, stream_options: { include_usage: true } }),
  };
  const parts = [encoder.encode(`${JSON.stringify(fields).slice(0, -1)},"messages":[`), ...messagesWire(request.messages), END];
  const chunks: Uint8Array[] = [];
  let small: Uint8Array[] = [];
  for (const part of parts) {
    if (part.length < OWN_CHUNK_BYTES) {
      small.push(part);
      continue;
    }
    if (small.length) chunks.push(Buffer.concat(small));
    small = [];
    chunks.push(part);
  }
  if (small.length) chunks.push(Buffer.concat(small));
  return chunks;
}

/**
 * Chunks as a body that undici lets go of once it has written them. undici keeps what it was given as a
 * body in the request's closures until the answer ends; this iterable gives each chunk up as it hands it
 * over (a generator would not: V8 keeps a finished generator's arguments). undici takes any iterable as a
 * body (its docs, Dispatcher.request); its types name only streams.
 */
class HandedOver implements IterableIterator<Uint8Array> {
  private handed = 0;

  constructor(private readonly chunks: (Uint8Array | undefined)[]) {}

  [Symbol.iterator](): this {
    return this;
  }

  next(): IteratorResult<Uint8Array, undefined> {
    if (this.handed === this.chunks.length) return { value: undefined, done: true };
    const chunk = this.chunks[this.handed]!;
    this.chunks[this.handed++] = undefined;
    return { value: chunk, done: false };
  }
}

/** What a stream's body may bring while its sink holds the reply back, and a chunk more, before it is paused: undici's high-water mark for a body. */
const HELD_BYTES_MAX = 64 * 1024;

/** How long the rest of a stream's body may take after its [DONE] (or its finish_reason) before its connection is closed. */
const DRAIN_AFTER_DONE_MS = 1_000;

/** Reads what is left of `body` in the background, or closes it if that takes too long (a response left open). */
function drainBriefly(body: Readable): void {
  const timer = setTimeout(() => body.destroy(), DRAIN_AFTER_DONE_MS);
  timer.unref();
  body.once('close', () => clearTimeout(timer));
  body.resume();
}

/**
 * A 4xx that no later try answers otherwise: not 401 or 403 (the key, or a project key without the
 * permission to delete files, which an operator puts right: given up on, the user's deleted file would
 * stay with the provider for good), nor 408 or 429 (transient).
 */
function refusedForGood(status: number): boolean {
  return status >= 400 && status < 500 && ![401, 403, 408, 429].includes(status);
}

/** How long to wait before retrying after `error`, or undefined when retrying cannot help. */
function retryWait(error: unknown, retry: number): number | undefined {
  if (error instanceof UpstreamUnreachable) return backoffMs(retry);
  const transient =
    error instanceof UpstreamStatusError && (error.status === 408 || (error.status === 429 && !error.outOfQuota) || error.status >= 500);
  if (!transient) return undefined;
  return retryAfterMs(error.headers) ?? backoffMs(retry);
}

/**
 * What failed a try of a call, as the metrics tell apart failures of one problem code (an upstream's 401,
 * its 500 and an exhausted quota are all PROVIDER_ERROR): the upstream's status (`401`, `503`…), `quota`
 * (a 429 that says the account has none left), `connection` (refused, reset, cut off) or `answer` (what
 * came is no answer: a malformed body or chunk, an error inside a stream).
 */
function upstreamFailure(error: unknown): string {
  if (error instanceof UpstreamStatusError) return error.outOfQuota ? 'quota' : String(error.status);
  // A stream that broke off after its first delta fails as it broke, not as UpstreamUnreachable: it is not retried.
  return error instanceof UpstreamUnreachable || brokeOff(error) ? 'connection' : 'answer';
}

/** What failed a call that threw `thrown` (see `upstreamFailure`); `timeout` when its deadline passed. */
export function providerFailureReason(thrown: ApiError): string {
  return thrown instanceof ProviderTimeout ? 'timeout' : upstreamFailure(thrown.cause);
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
  let mapped: ApiError;
  if (error instanceof UpstreamStatusError && error.outOfQuota) mapped = new ProviderError('The AI provider refused the request: its account has no quota left');
  else if (error instanceof UpstreamStatusError && error.status === 429) mapped = new ProviderRateLimited((retryAfterMs(error.headers) ?? 1000) / 1000);
  // The model's window is smaller than the budget the turn was fitted to (an unknown model, AI_CONTEXT_TOKENS
  // set too high): the client's to shorten, not an outage to wait out.
  else if (error instanceof UpstreamStatusError && error.contextTooLong) mapped = new ApiError(400, 'CONTEXT_TOO_LONG', 'The AI provider says the prompts and the history are longer than its model takes');
  // A project's model misspelt, or one a local server has not pulled: not an outage, and the client's to
  // tell from one (the project's model, or the server's AI_MODEL).
  else if (error instanceof UpstreamStatusError && error.noSuchModel) mapped = new ProviderError('The AI provider has no model of the name this chat asked for');
  else mapped = new ProviderError();
  mapped.cause = error;
  return mapped;
}

/**
 * An upstream's text as it can be stored: PostgreSQL text holds no NUL (U+0000), which becomes U+FFFD,
 * as a lone surrogate does on its way to the database. Unchanged, an answer holding one was paid for,
 * then refused by the database as if the client's question had been at fault (400).
 */
function storable(text: string): string {
  return text.replaceAll('\0', '\uFFFD');
}

function upstreamModel(model: unknown, fallback: string): string {
  return typeof model === 'string' && model !== '' ? storable(model) : fallback;
}

/** The largest count a message's token columns (PostgreSQL integer) hold. */
const MAX_TOKEN_COUNT = 2 ** 31 - 1;

const isTokenCount = (value: unknown): value is number => Number.isInteger(value) && (value as number) >= 0 && (value as number) <= MAX_TOKEN_COUNT;

/** The usage an upstream reports, or none when it reports counts that are not counts (fractions, negatives, past 2^31). */
function readUsage(usage: unknown): Usage | null {
  const { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total } = (usage ?? {}) as Record<string, unknown>;
  if (!isTokenCount(prompt) || !isTokenCount(completion)) return null;
  const totalTokens = isTokenCount(total) ? total : prompt + completion;
  return isTokenCount(totalTokens) ? { promptTokens: prompt, completionTokens: completion, totalTokens } : null;
}
