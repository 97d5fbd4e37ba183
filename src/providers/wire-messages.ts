import type { ChatMessage } from './types.js';

/**
 * The wire form of consecutive history messages, one after another in one buffer, each message's JSON
 * after a comma: a turn's history is then one view of it, not a copy, and the next turn, whose history
 * has the question and answer of the turn before after the same messages, adds them at its end. Bytes
 * are only ever written past the last message: a view handed to a request still being sent never changes.
 */
class Run {
  constructor(
    readonly bytes: Buffer,
    /** The number in its chain of its first message. */
    readonly first: number,
    /** The messages, in order: matched by identity, which needs no look inside each of thousands of them. */
    readonly messages: ChatMessage[] = [],
    /** Where each message's bytes begin, and past the last, where the next one goes. */
    readonly starts: number[] = [0],
  ) {}

  get end(): number {
    return this.starts[this.starts.length - 1]!;
  }

  /** The bytes of its messages `from` to `to`. */
  view(from: number, to: number): Uint8Array {
    return this.bytes.subarray(this.starts[from], this.starts[to]);
  }
}

/**
 * A history's messages, numbered in their order, and the run that holds them now. A message keeps its
 * chain and its number, which stay when the run is moved to a new buffer: a move changes this one
 * object, not thousands of messages, and the run it leaves is kept only by the requests still sending
 * a view of it.
 */
class Chain {
  constructor(public run: Run) {}
}

/**
 * A run's room to spare when it is moved, beyond what it holds then, for the turns after it, each adding
 * a few hundred bytes; and how much of it the messages a window leaves out may take before it is moved
 * again: a thirty-second each, so that a run keeps no more than a sixteenth beyond its messages' own
 * bytes (what the history cache counts). A run made whole (a history read anew) has none to spare: most
 * are not added to. A run of 6,000 messages is then moved about once in a hundred turns.
 */
const SLACK = (bytes: number) => bytes >> 5;

// A message's chain and its number there, on the message (symbols: nothing that serializes it sees
// them): looked at for the first message of a stretch, and for those added.
const CHAIN = Symbol('wire chain');
const NUMBER = Symbol('wire number');
type Placed = ChatMessage & { [CHAIN]?: Chain; [NUMBER]?: number };

const encoder = new TextEncoder();

/**
 * The JSON of `messages` as the chat completions API takes them, comma-separated, as parts to send in
 * order. The messages between the system messages and the last one (the turn's question, made for it)
 * are taken for stored history, the same objects turn after turn (the chat's history cache): their
 * bytes are kept, in runs, and the next turn's are mostly a view of the same run. Other messages are
 * made for their turn, and written afresh. Messages must not change once given here.
 */
export function messagesWire(messages: readonly ChatMessage[]): Uint8Array[] {
  const parts: Uint8Array[] = [];
  let loose = '';
  const last = messages.length - 1;
  // A message that cannot be marked (frozen) is written afresh, as one made for its turn.
  const history = (i: number) => i < last && messages[i]!.role !== 'system' && Object.isExtensible(messages[i]);
  for (let i = 0; i <= last; ) {
    if (!history(i)) {
      loose += `,${wireJson(messages[i]!)}`;
      i++;
      continue;
    }
    if (loose) parts.push(encoder.encode(loose));
    loose = '';
    const start = i;
    const first = messages[i] as Placed;
    const from = placeOf(first);
    const run = from === -1 ? undefined : first[CHAIN]!.run;
    // The run's messages for as long as they are these, in its order (a placed message is history).
    for (let place = from; run && i < last && run.messages[place] === messages[i]; place++) i++;
    // Past the run's end, or with no run, the messages that are in none are added to it.
    const matched = i;
    if (!run || from + (matched - start) === run.messages.length) while (history(i) && (i === start || placeOf(messages[i]!) === -1)) i++;
    // Moved, with what follows, once the messages it holds besides these take more than its slack.
    if (i === matched && !crowded(run!, from, from + (i - start))) {
      parts.push(run!.view(from, from + (i - start)));
      continue;
    }
    const holding = grown(run && first[CHAIN]!, from, messages as Placed[], start, matched, i);
    parts.push(holding.view(holding.messages.length - (i - start), holding.messages.length));
  }
  if (loose) parts.push(encoder.encode(loose));
  // Each message's JSON follows the comma that separates it from the one before: the first has none.
  if (parts.length) parts[0] = parts[0]!.subarray(1);
  return parts;
}

/**
 * The run that holds `messages` `start` to `end` as its last: those up to `matched` are `chain`'s
 * run's, from `from` to its end, and the rest are added after them: in that run when it has the room
 * and holds little besides them, else in a run of a new buffer that holds the stretch alone (what is
 * left behind is where the window has moved on from). A stretch of no chain starts one.
 */
function grown(chain: Chain | undefined, from: number, messages: Placed[], start: number, matched: number, end: number): Run {
  const added = messages.slice(matched, end).map((message) => `,${wireJson(message)}`);
  const bytes = added.reduce((sum, json) => sum + Buffer.byteLength(json), 0);
  const run = chain?.run;
  let holding = run;
  const to = from + (matched - start);
  if (!run || crowded(run, from, to) || run.end + bytes > run.bytes.length) {
    const kept = run ? run.view(from, to) : undefined;
    const size = (kept?.length ?? 0) + bytes;
    if (run && kept) {
      const offset = run.starts[from]!;
      holding = new Run(Buffer.allocUnsafeSlow(size + SLACK(size)), run.first + from, run.messages.slice(from, to), run.starts.slice(from, to + 1).map((at) => at - offset));
      holding.bytes.set(kept);
      chain!.run = holding;
    } else {
      holding = new Run(Buffer.allocUnsafeSlow(size), 0);
      chain = new Chain(holding);
    }
  }
  const target = holding!;
  for (let i = matched; i < end; i++) {
    const message = messages[i]!;
    message[CHAIN] = chain;
    message[NUMBER] = target.first + target.messages.length;
    target.messages.push(message);
    target.starts.push(target.end + target.bytes.write(added[i - matched]!, target.end));
  }
  return target;
}

/** Whether the bytes `run` holds besides its messages `from` to `to` (before them, and after) pass its slack. */
function crowded(run: Run, from: number, to: number): boolean {
  const own = run.starts[to]! - run.starts[from]!;
  return run.end - own > SLACK(own);
}

/** Where `message` is in its chain's run, or -1: a copy of a placed message carries its symbols, and is in none. */
function placeOf(message: ChatMessage): number {
  const chain = (message as Placed)[CHAIN];
  if (!chain) return -1;
  const place = (message as Placed)[NUMBER]! - chain.run.first;
  return chain.run.messages[place] === message ? place : -1;
}

/**
 * A message as the API takes it: only the fields of the wire format (callers may hand over richer
 * objects, such as stored rows); provider files go first, as file content parts of a user message.
 */
function wireJson({ role, content, fileIds }: ChatMessage): string {
  const files = role === 'user' && fileIds?.length ? fileIds.map((id) => ({ type: 'file', file: { file_id: id } })) : undefined;
  return JSON.stringify(files ? { role, content: [...files, { type: 'text', text: content }] } : { role, content });
}
