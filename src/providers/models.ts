import { GptEncoding } from 'gpt-tokenizer/GptEncoding';
import { DEFAULT_ENCODING, type EncodingName, modelToEncodingMap } from 'gpt-tokenizer/mapping';
import * as catalog from 'gpt-tokenizer/models';
import { resolveEncoding } from 'gpt-tokenizer/resolveEncoding';
import { setImmediate as turn } from 'node:timers/promises';

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
 * in slices of this length, each counted a token more than it counts alone (see `Piece`).
 */
const MAX_RUN = 128;

/**
 * A text's count is at most its UTF-8 bytes and a token for each this many of its code points, what a
 * turn's read checks a question's prompts by before it stores the question (`turnStatementOn`): a token
 * is at least a byte, and a piece is counted a token more (see `Piece`) only as a slice of a run longer
 * than MAX_RUN code points, slices of MAX_RUN UTF-16 units (64 code points of four bytes: under 3
 * slices for every 128 code points of such a run), or as a stretch of PACED_TEXT units or more cut
 * where the encodings do not cut. Counted a token a byte alone, a run of such characters passed the
 * check and was then refused by its count, its question stored.
 */
export const CODE_POINTS_PER_ADDED_TOKEN = 32;

/**
 * A piece of a text as it is counted, and the tokens added to its count: 1 for a piece cut where the
 * encodings do not cut (a long run's slice; a stretch that offered no place to cut), as the tokens of
 * the two sides of such a cut may be one fewer than the whole's. So the count is never under the exact
 * one, which a context's budget needs: under it, a context was sent over the model's window (a run of
 * 211 spaces before `:/` counted 3 tokens, where it is 5).
 */
type Piece = readonly [text: string, extra: 0 | 1];

// Text is counted as the user wrote it: `<|endoftext|>` in a message is text, not a special token
// (by default gpt-tokenizer throws on it).
const AS_PLAIN_TEXT = { disallowedSpecial: new Set<string>() };

// gpt-tokenizer caches the merges of words it has seen, 100,000 of them by default, up to MAX_RUN
// characters each, for the life of the process; common words never reach the cache (they are tokens).
const MERGE_CACHE_ENTRIES = 10_000;

const encodings = new Map<EncodingName, GptEncoding>();

/**
 * `openai/gpt-4o-mini:free` → `gpt-4o-mini`: a router's vendor prefix and variant suffix name the same
 * model; and so does an OpenAI fine-tune its base model's (`ft:gpt-4-0613:org::id` → `gpt-4-0613`).
 */
function baseModelName(model: string): string {
  const name = model.slice(model.lastIndexOf('/') + 1).replace(/^ft:/i, '');
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
  for (const [piece, extra] of pieces(text)) total += encoding.countTokens(piece, AS_PLAIN_TEXT) + extra;
  return total;
}

/**
 * Beyond this many UTF-16 units a text is counted a piece at a time by `countTokensPaced`, and pieces
 * are one to two times this long: a piece takes at most about 10 ms (the slowest texts measured, random
 * CJK or letters with a space every 128, 1.5–2.2 µs a character), where a whole message of 100,000
 * characters took up to 220 ms, during which the process answered nobody.
 */
export const PACED_TEXT = 2_048;

/**
 * Characters counted since the event loop last had a turn, by every caller together: a turn's many
 * short texts (a project's prompts, its history in another encoding, its small files), each counted at
 * once, held the loop for a quarter of a second on a project's first turn. Reset by a callback queued
 * behind the counting, which runs only once the loop has its turn.
 */
let countedSinceTurn = 0;

function counted(characters: number): void {
  if (countedSinceTurn === 0) setImmediate(() => (countedSinceTurn = 0));
  countedSinceTurn += characters;
}

/**
 * `countTokens`'s count; for a text longer than `PACED_TEXT`, a promise of it, counted a piece at a time
 * with the event loop free to run other requests between pieces; and for a short one too once
 * `PACED_TEXT` characters were counted since the loop's last turn (`countedSinceTurn`). With a `limit`,
 * undefined as soon as the count is past it: a text that cannot fit costs the counting of what fits and
 * a piece more, not of all of it (a file of megabytes, at every turn of its project).
 */
export function countTokensPaced(text: string, model: string): number | Promise<number>;
export function countTokensPaced(text: string, model: string, limit: number): Counted;
export function countTokensPaced(text: string, model: string, limit = Infinity): Counted {
  if (text.length > PACED_TEXT || countedSinceTurn + text.length > PACED_TEXT) return countInTurns(text, encodingFor(model), limit);
  const count = countTokens(text, model);
  counted(text.length);
  return count > limit ? undefined : count;
}

/** A count, or undefined for one past its limit; a promise of either for a long text. */
export type Counted = number | undefined | Promise<number | undefined>;

async function countInTurns(text: string, encoding: GptEncoding, limit: number): Promise<number | undefined> {
  let total = 0;
  for (const [piece, extra] of pieces(text)) {
    // Before a piece rather than after one: nothing waits for a turn once the last is counted.
    if (countedSinceTurn > 0 && countedSinceTurn + piece.length > PACED_TEXT) await turn();
    total += encoding.countTokens(piece, AS_PLAIN_TEXT) + extra;
    counted(piece.length);
    if (total > limit) return undefined;
  }
  return total;
}

/**
 * The text as counted: each run (of whitespace, or of anything else) longer than MAX_RUN code points in
 * slices of MAX_RUN (a whitespace run but for its last character, before the text after it), and what lies between such runs in pieces of `PACED_TEXT` to twice that, cut where
 * the encodings' patterns cut anyway (`cutsThere`), so that their counts add up to the count of the
 * whole. Runs are found in one pass over the text: a pattern such as `\S{129,}` tried at every
 * position reads up to 128 characters at each (20 ms for 100,000 letters with a space every 128), and
 * overflowed the pattern engine's stack on a run of millions (a reply an upstream made that long,
 * stored, broke every later turn of its project).
 */
function* pieces(text: string): Generator<Piece> {
  let counted = 0;
  for (let start = 0; start < text.length; ) {
    const space = isWhitespace(text.charCodeAt(start));
    let end = start;
    let codePoints = 0;
    for (let code = text.charCodeAt(end); end < text.length && isWhitespace(code) === space; code = text.charCodeAt(++end)) {
      // A pair is one code point; a low surrogate alone is one too, as the `u` flag of a pattern counts it.
      if (!isLowSurrogate(code) || !isHighSurrogate(text.charCodeAt(end - 1))) codePoints++;
    }
    if (codePoints > MAX_RUN) {
      // The encodings leave a whitespace run's last character to what follows it (` word`, ` :/`): so
      // does the count. (Whitespace is one UTF-16 unit.)
      const runEnd = space && end < text.length ? end - 1 : end;
      yield* cutBetweenRuns(text, counted, start);
      for (let slice = start; slice < runEnd; ) {
        let sliceEnd = Math.min(slice + MAX_RUN, runEnd);
        if (isHighSurrogate(text.charCodeAt(sliceEnd - 1)) && sliceEnd < runEnd) sliceEnd++; // keep a code point whole
        yield [text.slice(slice, sliceEnd), 1];
        slice = sliceEnd;
      }
      counted = runEnd;
    }
    start = end;
  }
  yield* cutBetweenRuns(text, counted, text.length);
}

function* cutBetweenRuns(text: string, start: number, end: number): Generator<Piece> {
  while (end - start > 2 * PACED_TEXT) {
    let cut = start + PACED_TEXT;
    const last = start + 2 * PACED_TEXT;
    while (cut < last && !cutsThere(text, cut, end)) cut++;
    // No such place (every space led by a line break and itself leading to one): cut anyway, counted a
    // token more, as a long run's slices are.
    const forced = cut === last;
    if (forced && isHighSurrogate(text.charCodeAt(cut - 1))) cut++;
    yield [text.slice(start, cut), forced ? 1 : 0];
    start = cut;
  }
  if (end > start) yield [text.slice(start, end), 0];
}

/**
 * Whether both encodings' pre-tokenizers (cl100k_base's, o200k_base's) start a piece at `index` of the
 * text counted up to `end`, and would start the same pieces from there in the text cut there:
 *  - whitespace other than a line break after a visible character: no pattern takes whitespace after a
 *    visible character, but line breaks after punctuation (`?[^\s\p{L}\p{N}]+[\r\n]*`);
 *  - a visible character after a line break, other than a slash: o200k_base's pattern for punctuation
 *    takes line breaks and slashes after it (`?[^\s\p{L}\p{N}]+[\r\n/]*`), no other pattern a line break
 *    and what follows it;
 *  - whitespace after a line break (an indentation), when no line break follows in it and a visible
 *    character ends it before `end`: the patterns for whitespace that takes line breaks (`\s*[\r\n]`,
 *    `\s*[\r\n]+`, `\s+$`) end at the last line break before a visible character.
 * No pattern looks behind, and those that look ahead (`\s+(?!\S)`, `\s+$`) look past whitespace only:
 * a first part that ends in whitespace ends in a line break, and cl100k_base's `\s+$` takes there the
 * whitespace that its `\s*[\r\n]` takes in the whole. `test/providers/models.test.ts` checks the sums.
 */
function cutsThere(text: string, index: number, end: number): boolean {
  const before = text.charCodeAt(index - 1);
  const at = text.charCodeAt(index);
  if (!isLineBreak(before)) return !isWhitespace(before) && isWhitespace(at) && !isLineBreak(at);
  if (!isWhitespace(at)) return at !== SLASH;
  for (let next = index; next < end; next++) {
    const code = text.charCodeAt(next);
    if (isLineBreak(code)) return false;
    if (!isWhitespace(code)) return true;
  }
  return false;
}

/** Whether the UTF-16 unit is one that `\s` matches (all of them are in the Basic Multilingual Plane). */
function isWhitespace(code: number): boolean {
  if (code <= 0x20) return code === 0x20 || (code >= 0x09 && code <= 0x0d);
  if (code < 0xa0) return false;
  return (
    code === 0xa0 ||
    code === 0x1680 ||
    (code >= 0x2000 && code <= 0x200a) ||
    code === 0x2028 ||
    code === 0x2029 ||
    code === 0x202f ||
    code === 0x205f ||
    code === 0x3000 ||
    code === 0xfeff
  );
}

const SLASH = 0x2f;

function isLineBreak(code: number): boolean {
  return code === 0x0a || code === 0x0d;
}

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

function isLowSurrogate(code: number): boolean {
  return code >= 0xdc00 && code <= 0xdfff;
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
