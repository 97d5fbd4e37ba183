import { GptEncoding } from 'gpt-tokenizer/GptEncoding';
import { DEFAULT_ENCODING, type EncodingName, modelToEncodingMap } from 'gpt-tokenizer/mapping';
import * as catalog from 'gpt-tokenizer/models';
import { resolveEncoding } from 'gpt-tokenizer/resolveEncoding';

/**
 * Tokens a chat message costs beyond its content: the framing tokens around it plus its role name
 * (`<|im_start|>user<|im_sep|>…<|im_end|>`), as OpenAI's chat format counts them.
 */
export const MESSAGE_OVERHEAD_TOKENS = 4;

/** Tokens that prime the reply (`<|im_start|>assistant<|im_sep|>`), once per request. */
export const REPLY_PRIMING_TOKENS = 3;

/**
 * BPE merging is quadratic in the length of one pre-tokenized piece, and a piece can be as long as a
 * run without whitespace (or a run of whitespace): 100,000 CJK characters took 37 s, 100,000 letters
 * without a space 4 s, all on the event loop. Runs up to this length are counted exactly; longer ones
 * in slices of this length, which adds at most a token or so per slice.
 */
const MAX_RUN = 128;
/**
 * An unbounded `{129,}` overflows the regular expression engine's stack on a run of some millions of
 * characters (a reply an upstream made that long, stored, broke every later turn of its project): a
 * longer run is matched as several, each cut in slices all the same. `u`: a match never splits a code point.
 */
const LONG_RUN_MATCH = 65_536;
const LONG_RUN = new RegExp(`\\S{${MAX_RUN + 1},${LONG_RUN_MATCH}}|\\s{${MAX_RUN + 1},${LONG_RUN_MATCH}}`, 'gu');

// Text is counted as the user wrote it: `<|endoftext|>` in a message is text, not a special token
// (by default gpt-tokenizer throws on it).
const AS_PLAIN_TEXT = { disallowedSpecial: new Set<string>() };

// gpt-tokenizer caches the merges of words it has seen, 100,000 of them by default, up to MAX_RUN
// characters each, for the life of the process; common words never reach the cache (they are tokens).
const MERGE_CACHE_ENTRIES = 10_000;

const encodings = new Map<EncodingName, GptEncoding>();

/** `openai/gpt-4o-mini:free` → `gpt-4o-mini`: a router's vendor prefix and variant suffix name the same model. */
function baseModelName(model: string): string {
  const name = model.slice(model.lastIndexOf('/') + 1);
  const variant = name.indexOf(':');
  return (variant === -1 ? name : name.slice(0, variant)).toLowerCase();
}

/** The name of the model's encoding when gpt-tokenizer knows it, else o200k_base (every current OpenAI model's). */
export function encodingName(model: string): EncodingName {
  const name = baseModelName(model);
  return Object.hasOwn(modelToEncodingMap, name) ? modelToEncodingMap[name as keyof typeof modelToEncodingMap] : DEFAULT_ENCODING;
}

function encodingFor(model: string): GptEncoding {
  const name = encodingName(model);
  let encoding = encodings.get(name);
  if (!encoding) {
    // Built on first use: each encoding's rank tables take tens of MB.
    encoding = GptEncoding.getEncodingApi(name, resolveEncoding);
    encoding.setMergeCacheSize(MERGE_CACHE_ENTRIES);
    encodings.set(name, encoding);
  }
  return encoding;
}

/** Tokens of `text` for `model`, counted by its BPE encoding (never estimated from characters). */
export function countTokens(text: string, model: string): number {
  const encoding = encodingFor(model);
  let total = 0;
  let counted = 0;
  for (const run of text.matchAll(LONG_RUN)) {
    total += encoding.countTokens(text.slice(counted, run.index), AS_PLAIN_TEXT);
    const end = run.index + run[0].length;
    for (let start = run.index; start < end; ) {
      let sliceEnd = Math.min(start + MAX_RUN, end);
      if (isHighSurrogate(text.charCodeAt(sliceEnd - 1)) && sliceEnd < end) sliceEnd++; // keep a code point whole
      total += encoding.countTokens(text.slice(start, sliceEnd), AS_PLAIN_TEXT);
      start = sliceEnd;
    }
    counted = end;
  }
  return total + encoding.countTokens(text.slice(counted), AS_PLAIN_TEXT);
}

export function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

/** The model's name in gpt-tokenizer's catalog (`openai/gpt-4o`, `GPT-4o:latest` → `gpt-4o`), when it is there. */
export function catalogName(model: string): string | undefined {
  const name = baseModelName(model);
  return Object.hasOwn(catalog, name) ? name : undefined;
}

/** The model's context window in tokens, when gpt-tokenizer's catalog knows the model. */
export function contextWindow(model: string): number | undefined {
  const name = catalogName(model);
  if (name === undefined) return undefined;
  // Not every catalog entry has a context window (image and speech models do not).
  const spec = catalog[name as keyof typeof catalog] as { context_window?: number };
  return spec.context_window;
}
