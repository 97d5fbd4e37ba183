import { ApiError, retryAfterSeconds } from '../http/errors.js';

export type ProviderName = 'openai' | 'openrouter';

/** Not changed once handed to an adapter, which may keep what it derives from it (its wire form) as long as it lives. */
export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
  /**
   * Files the provider holds, sent with a user message as file content parts. Only given to an
   * adapter whose `supportsFiles` is true.
   */
  fileIds?: string[];
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
}

/** What ends a provider call: a chat, or a file's upload or deletion. */
export interface CallBounds {
  /**
   * Aborts the whole call, retries and waits included: the request's deadline or a client that left.
   * An abort whose reason is a `TimeoutError` (as `AbortSignal.timeout` gives) is the deadline and ends
   * in ProviderTimeout; any other abort is rethrown as its reason, untouched.
   */
  signal: AbortSignal;
  /**
   * When the signal's deadline fires (epoch ms), which a signal cannot tell: a retry whose wait
   * (Retry-After) would end past it is given up at once (429 → ProviderRateLimited) instead of being
   * slept on until the signal fires (→ ProviderTimeout). Without it only the signal bounds the waits.
   */
  deadline?: number;
  /** The log of the request the call is made for, where its retries are logged: without it, the server's, which names no request. */
  log?: CallLog;
}

export interface ChatRequest extends CallBounds {
  model: string;
  messages: ChatMessage[];
  maxOutputTokens: number;
  /**
   * A stream's: called on each chunk its upstream sends, text or not. A reasoning model streams its
   * thinking (`reasoning_content`) for a long while before its first text, and is not silent meanwhile.
   */
  onProgress?: () => void;
}

/**
 * How a reply ended, said by its `finish_reason`: whole, or cut short by the upstream, at its output
 * limit (`length`) or by its content filter (`content_filter`), its text stored then as `incomplete`.
 */
export interface ReplyEnd {
  /** The model that answered, as the upstream names it. */
  model: string;
  usage: Usage | null;
  cutShort: boolean;
}

export interface ChatCompletion extends ReplyEnd {
  content: string;
}

/**
 * Where a streamed reply's text goes, a piece at a time, as the upstream sends it, with the model that
 * answers as the upstream has named it so far (the one asked for until it names one). A promise returned
 * holds the rest of the reply back until it settles (a slow client), which it must: neither a failure
 * nor the signal ends the call while it is pending. One that rejects ends the call with ProviderError.
 */
export type DeltaSink = (content: string, model: string) => void | Promise<void>;

export interface UploadedFile {
  providerFileId: string;
}

/**
 * One AI provider. `complete` and `stream` retry upstream 429/5xx/timeouts themselves within the
 * request's signal, and throw only the provider errors below; an answer they resolve with has text (see
 * `EmptyAnswer`). A stream may also fail mid-way (after deltas were given to its sink), with the same
 * error classes.
 */
export interface ProviderAdapter {
  readonly name: ProviderName;
  /** Whether this provider has a Files API (OpenAI does; OpenRouter and most local servers do not). */
  readonly supportsFiles: boolean;
  complete(request: ChatRequest): Promise<ChatCompletion>;
  stream(request: ChatRequest, onDelta: DeltaSink): Promise<ReplyEnd>;
  uploadFile?(file: { filename: string; mimeType: string; path: string }, bounds: CallBounds): Promise<UploadedFile>;
  deleteFile?(providerFileId: string, bounds: CallBounds): Promise<void>;
}

/** Upstream 5xx, malformed bodies, refused connections: 502. */
export class ProviderError extends ApiError {
  constructor(detail = 'The AI provider failed to answer', extensions: Record<string, unknown> = {}) {
    super(502, 'PROVIDER_ERROR', detail, extensions);
  }
}

/**
 * An answer with no text (a stream too: nothing but empty deltas and its end), which nothing can store:
 * a failed call, whose tokens were still reported, and billed: `usage` is what the upstream said of them.
 */
export class EmptyAnswer extends ProviderError {
  constructor(readonly usage: Usage | null) {
    super('The AI provider answered with no content');
  }
}

/**
 * A file's deletion refused with a 4xx that asking again cannot change (400, 422…), not one that may
 * pass: 401 and 403 (the key or its permissions, which an operator puts right), 404 (already gone: deleted), 408 and 429.
 */
export class ProviderRefusedDeletion extends ProviderError {
  constructor(readonly upstreamStatus: number) {
    super(`The AI provider refused to delete the file (${upstreamStatus})`);
  }
}

/**
 * Upstream 429 after every retry: 503 with Retry-After (whole seconds, at least 1), the same seconds also
 * as `retryAfter` in the problem: a streamed turn's `error` event comes after the headers, where no header
 * can carry them.
 */
export class ProviderRateLimited extends ApiError {
  readonly retryAfterSeconds: number;

  constructor(waitSeconds: number, extensions: Record<string, unknown> = {}) {
    const seconds = retryAfterSeconds(waitSeconds);
    super(
      503,
      'PROVIDER_RATE_LIMITED',
      'The AI provider is rate limiting requests; try again later',
      { ...extensions, retryAfter: seconds },
      { 'retry-after': String(seconds) },
    );
    this.retryAfterSeconds = seconds;
  }
}

/** No answer within AI_TIMEOUT_MS for the whole request: 504. */
export class ProviderTimeout extends ApiError {
  constructor(extensions: Record<string, unknown> = {}) {
    super(504, 'PROVIDER_TIMEOUT', 'The AI provider did not answer in time', extensions);
  }
}

/** What configures each provider, as the error and the start's warning name it. */
export const PROVIDER_SETTINGS: Record<ProviderName, string> = {
  openai: 'OPENAI_API_KEY, or AI_BASE_URL for another OpenAI-compatible server',
  openrouter: 'OPENROUTER_API_KEY, or AI_BASE_URL for another OpenAI-compatible server',
};

/** No key and no base URL for the provider a chat needs: 503, before anything is stored. */
export class ProviderNotConfigured extends ApiError {
  constructor(provider: ProviderName) {
    super(503, 'PROVIDER_NOT_CONFIGURED', `The AI provider "${provider}" is not configured on this server (its operator sets ${PROVIDER_SETTINGS[provider]})`);
  }
}

/** A failed try of a call about to be tried again. */
export interface ProviderRetry {
  provider: ProviderName;
  /** What failed it: the upstream's status (`429`, `503`…), or `connection` (refused, reset, cut off). */
  reason: string;
  /** Its number: 1 for the first retry. */
  retry: number;
  waitMs: number;
}

/**
 * Told of each retry of a provider call, before its wait (see `OpenAICompatibleOptions.onRetry`), with
 * the log of the request the call is made for, when it has one (`CallBounds.log`).
 */
export type RetryListener = (retry: ProviderRetry, log: CallLog | undefined) => void;

/** A request's log (Fastify's, pino's): what it writes carries the request's id. */
export interface CallLog {
  warn(fields: object, message: string): void;
}
