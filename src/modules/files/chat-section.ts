import { type Counted, MESSAGE_OVERHEAD_TOKENS } from '../../providers/models.js';
import { TokenCounts } from '../../providers/token-counts.js';
import type { ChatMessage } from '../../providers/types.js';
import { isTextType } from './content-type.js';
import { bytesGone } from './storage.js';

/*
 * What a project's files add to a chat turn: one system message, after the prompts and before the
 * history, given whatever the budget leaves once the prompts and the new message are counted.
 *  - Files are taken newest first. A text file (text/*, JSON) goes in whole, under a line naming it,
 *    when it fits in what is left; one that does not is named as left out, and older files that fit
 *    still go in. A file is never cut in half.
 *  - A PDF with a provider copy, when the provider reads files (OpenAI), is named and sent by
 *    reference: a file content part of the new user message. OpenAI's Chat Completions reads no
 *    other type that way. Its tokens are the provider's to count: they are not in the budget. Its
 *    bytes are counted: OpenAI refuses a request whose files hold more than 32 MB in all, and so would
 *    refuse every turn of the project; a PDF past that is named as left out, older ones that fit still go.
 *  - Any other file is named, with its type, and not sent.
 *  - Naming stops at the first file whose line no longer fits.
 */

export interface ContextFile {
  id: string;
  filename: string;
  mimeType: string;
  size: number;
  providerFileId: string | null;
  /**
   * The file's text; read only for a text file that may fit. Rejects as `bytesGone` for a file deleted
   * since; bytes missing while the file is still recorded (an instance without the shared DATA_DIR) fail
   * the turn (BytesMissing, service.ts).
   */
  readText(): Promise<string>;
}

export interface FilesSection {
  message: ChatMessage;
  tokens: number;
  /** Provider files to send with the new user message. */
  fileIds: string[];
}

export interface FilesSectionOptions {
  /** Tokens the section may take, its message framing included. */
  budget: number;
  /**
   * The tokens of `text`, or undefined as soon as they are past `limit` (`countTokensPaced`): a file that
   * cannot fit costs the counting of what fits, not of all of it.
   */
  countText(text: string, limit: number): Counted;
  /** Whether the provider of this turn reads provider files (PDF content parts). */
  providerReadsFiles: boolean;
  /** The encoding `countText` counts in, and the counts of the files' entries in it from earlier turns. */
  counted?: { encoding: string; counts: EntryCounts };
}

/** What counting a text file's entry found: its tokens, or that they are more than `over`. */
type EntryCount = { tokens: number } | { over: number };

/**
 * The counts of text files' entries (the line naming a file, and its text), by file: a file's bytes and
 * name never change, so a count holds for as long as the file is there.
 */
export class EntryCounts extends TokenCounts<EntryCount> {}

const HEADER = 'Files attached to this project, newest first:';
const PDF = 'application/pdf';

/**
 * No real text takes more bytes per token than this, so a longer file cannot fit what is left and is
 * not read; and a turn reads at most its budget times this many bytes of files in all. Prose takes 4
 * or so; separators and indentation take more: lines of 80 dashes 40, of 64 `=` 33, indentation of 120
 * spaces 31 (16, before, left out such files where they fitted).
 */
export const MAX_BYTES_PER_TOKEN = 64;

/** OpenAI reads at most 32 MB of file inputs in one request (its guide to PDF inputs); MB or MiB, this is within. */
const MAX_REFERENCED_BYTES = 32_000_000;

export async function buildFilesSection(files: ContextFile[], options: FilesSectionOptions): Promise<FilesSection | undefined> {
  const { budget, countText } = options;
  // Entries start on a new line: their counts add up to the whole's, or to a token more where the text
  // before one ends in punctuation or whitespace, which the tokenizer takes with the line breaks.
  const header = await countText(HEADER, budget - MESSAGE_OVERHEAD_TOKENS);
  if (header === undefined) return undefined;
  let tokens = MESSAGE_OVERHEAD_TOKENS + header;
  let readable = budget * MAX_BYTES_PER_TOKEN;
  let referable = MAX_REFERENCED_BYTES;
  const entries: string[] = [];
  const fileIds: string[] = [];

  for (const file of files) {
    const heading = `\n\n--- ${file.filename} (${file.mimeType}) ---\n`;
    if (isTextType(file.mimeType) && file.size <= Math.min(readable, (budget - tokens) * MAX_BYTES_PER_TOKEN)) {
      readable -= file.size;
      const room = budget - tokens;
      const known = options.counted?.counts.get(file.id, options.counted.encoding);
      // Known not to fit: not read again (so one deleted meanwhile is named, not passed over as below).
      // Known to fit: read, not counted again.
      const fitsNot = known && ('over' in known ? known.over >= room : known.tokens > room);
      const text = fitsNot
        ? null
        : await file.readText().catch((error: unknown) => {
            if (bytesGone(error)) return undefined;
            throw error;
          });
      // Deleted while this turn was read (a concurrent DELETE): as if it had never been there.
      if (text === undefined) continue;
      if (text !== null) {
        const entry = heading + text;
        const cost = known && 'tokens' in known ? known.tokens : await countText(entry, room);
        options.counted?.counts.set(file.id, options.counted.encoding, cost === undefined ? { over: room } : { tokens: cost });
        if (cost !== undefined) {
          entries.push(entry);
          tokens += cost;
          continue;
        }
      }
    }
    const attachable = options.providerReadsFiles && file.mimeType === PDF ? file.providerFileId : null;
    const reference = attachable && file.size <= referable ? attachable : null;
    const entry = heading + note(file, reference, attachable);
    const cost = await countText(entry, budget - tokens);
    if (cost === undefined) break;
    entries.push(entry);
    tokens += cost;
    if (reference) {
      fileIds.push(reference);
      referable -= file.size;
    }
  }
  if (entries.length === 0) return undefined;
  return { message: { role: 'system', content: HEADER + entries.join('') }, tokens, fileIds };
}

function note(file: ContextFile, reference: string | null, attachable: string | null): string {
  if (reference) return '[attached to the latest user message]';
  if (attachable) return '[not included: over the provider\'s limit for attached files]';
  if (isTextType(file.mimeType)) return '[not included: too long for the context]';
  return '[not included: only its name and type are known]';
}
