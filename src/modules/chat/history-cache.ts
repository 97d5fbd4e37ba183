import type { HistoryMessage } from './context.js';

/** A stored message as a turn reads it: `tokens` counts its content in `encoding`, when stored with. */
export interface StoredHistoryMessage {
  id: string;
  role: HistoryMessage['role'];
  content: string;
  replyTo: string | null;
  tokens: number | null;
  encoding: string | null;
}

/** A project's history, newest first, as far as a turn read it. */
export interface KnownHistory {
  messages: StoredHistoryMessage[];
  /** The oldest stored message is the last of `messages`: there is nothing older to read. */
  complete: boolean;
  /** The revision of the project's history it was read at (see `turnStatementOn`): a stored message changed since is another. */
  revision: number;
  /**
   * What `messages` take of a request in `encoding`, each message's framing included, when every one
   * carries its stored count in it: the next turn then finds where its window ends by the oldest
   * messages it drops, instead of counting the thousands it keeps.
   */
  tokens?: { encoding: string; total: number };
}

/** A history that holds, from `from` on, the first `kept` messages of `cached`, the same objects; the rest is new. */
export interface Continuation {
  cached: KnownHistory;
  from: number;
  kept: number;
}

/** A turn's newest page lined up with the cached history: what of the page is newer, then the cached history. */
export interface ExtendedHistory {
  newer: StoredHistoryMessage[];
  cached: KnownHistory;
}

// What a cached message costs besides its text: the object and its id.
const MESSAGE_BYTES = 200;
/** Any character past Latin-1: V8 then keeps the whole string two bytes a character, not one. */
const TWO_BYTE = /[\u0100-\uffff]/;

/**
 * What a message's text keeps in memory: the string, and the wire form an adapter keeps with the message
 * (see providers/wire-messages.ts), UTF-8 of its JSON. Counted three bytes a character, Chinese text
 * (two in the string, three in UTF-8) held 1.6 times the cache's bytes, and control characters (one in
 * the string, six in JSON: `\u0001`) 3.3 times.
 */
function textBytes(content: string): number {
  return (TWO_BYTE.test(content) ? 2 : 1) * content.length + Buffer.byteLength(JSON.stringify(content));
}

/**
 * A message's bytes, counted once and kept on the message: a long conversation's turns remember the
 * same thousands of messages each time, and counting them all again (a JSON form of each) took most of
 * a millisecond a turn. A symbol: nothing that serializes the message sees it.
 */
const BYTES = Symbol('bytes');
type Counted = StoredHistoryMessage & { [BYTES]?: number };
const messageBytes = (message: Counted) => (message[BYTES] ??= MESSAGE_BYTES + textBytes(message.content));

function sumBytes(messages: StoredHistoryMessage[], from: number, to: number): number {
  let bytes = 0;
  for (let i = from; i < to; i++) bytes += messageBytes(messages[i]!);
  return bytes;
}

/** What a service that deletes messages (a clear, a project's or an account's deletion) needs of the cache. */
export type ForgetsHistory = Pick<HistoryCache, 'forget'>;

/**
 * The history that turns read past their first page, per project, in this process, so that the next
 * turn of a long conversation reads its newest page and not the thousands of messages behind it again.
 * Messages are never changed once stored but for a question marked failed, which the revision of the
 * project's history counts (whichever instance marked it; this one also forgets it here, with what turns
 * reading meanwhile would keep); they are only added (newer than all others, as a rule) and removed all
 * at once (history cleared, project deleted). So a project's cached history still holds when it was read
 * at the project's revision now, and the newest page read now contains the cached newest message and,
 * from there on, the same messages as the cache: what is newer comes from the page, the rest from the
 * cache. A cleared history, a message stored out of order within that page (by hand: the service stamps each message
 * after the project's newest, see `message_stamp`) or anything else that does not line up is a miss,
 * and the turn reads from the database as if there were no cache. Least recently used projects go
 * first past `maxBytes`.
 */
export class HistoryCache {
  private readonly entries = new Map<string, { history: KnownHistory; bytes: number }>();
  /** The bytes of each history kept, for as long as anything holds it: what a history continuing it counts from. */
  private readonly sizes = new WeakMap<KnownHistory, number>();
  private bytes = 0;
  /** How many times a history was forgotten: what a turn reads before its history, for `remember`. */
  private forgotten = 0;

  constructor(private readonly maxBytes: number) {}

  /**
   * The project's history: what of `newestPage` (read now, at the history's `revision`, newest first) is
   * newer than what the cache holds, when the two line up.
   */
  extend(projectId: string, newestPage: StoredHistoryMessage[], revision: number): ExtendedHistory | undefined {
    const entry = this.entries.get(projectId);
    if (!entry || entry.history.revision !== revision) return undefined;
    const cached = entry.history.messages;
    const start = newestPage.findIndex((message) => message.id === cached[0]!.id);
    const overlap = newestPage.length - start;
    if (start === -1 || overlap > cached.length) return undefined;
    for (let i = 1; i < overlap; i++) if (newestPage[start + i]!.id !== cached[i]!.id) return undefined;
    // Used now: the newest in the map's order, the last to go.
    this.entries.delete(projectId);
    this.entries.set(projectId, entry);
    return { newer: newestPage.slice(0, start), cached: entry.history };
  }

  /** The cache's version, to be read before a turn reads its history, and given to `remember`. */
  get version(): number {
    return this.forgotten;
  }

  /**
   * Keeps `history`, which a turn began to read at `version` `readAt`, unless a history was forgotten
   * since: the turn may have read the message that was forgotten for (in any project: forgetting is
   * rare, and the next turn reads its history from the database). A history that `continues` one this
   * cache gave (`extend`) is counted by what changed: counting each of the thousands of messages of a
   * long conversation again took, with the window's copy, a fifth of a millisecond a turn.
   */
  remember(projectId: string, history: KnownHistory, readAt: number, continues?: Continuation): void {
    if (readAt !== this.forgotten) return;
    this.drop(projectId);
    const bytes = this.bytesOf(history.messages, continues);
    if (bytes > this.maxBytes) return;
    this.entries.set(projectId, { history, bytes });
    this.sizes.set(history, bytes);
    this.bytes += bytes;
    for (const [oldest, entry] of this.entries) {
      if (this.bytes <= this.maxBytes) break;
      this.entries.delete(oldest);
      this.bytes -= entry.bytes;
    }
  }

  /** Drops the project's history, and what turns reading it now would keep: one of its messages changed. */
  forget(projectId: string): void {
    this.forgotten++;
    // Its id as the database prints it (small letters), which the cache is keyed by, however a path spelled it.
    this.drop(projectId.toLowerCase());
  }

  private bytesOf(messages: StoredHistoryMessage[], continues?: Continuation): number {
    const known = continues && this.sizes.get(continues.cached);
    if (known === undefined) return sumBytes(messages, 0, messages.length);
    const { cached, from, kept } = continues!;
    const added = sumBytes(messages, 0, from) + sumBytes(messages, from + kept, messages.length);
    return known + added - sumBytes(cached.messages, kept, cached.messages.length);
  }

  private drop(projectId: string): void {
    const entry = this.entries.get(projectId);
    if (!entry) return;
    this.entries.delete(projectId);
    this.bytes -= entry.bytes;
  }
}
