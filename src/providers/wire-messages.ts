import type { ChatMessage } from './types.js';

/** How many consecutive messages share one block of bytes. */
const BLOCK_MESSAGES = 64;

/** The wire form of `messages`, consecutive, as one run of bytes. */
interface Block {
  messages: ChatMessage[];
  bytes: Uint8Array;
}

const encoder = new TextEncoder();

/**
 * Blocks by their first message, for as long as that message object lives. A long history's messages
 * are the same objects turn after turn (the chat's history cache), so most of a turn's body is blocks
 * made by the turns before it: a turn sending 6,000 messages joins about a hundred runs of bytes
 * instead of serializing 600 KB, or copying 6,000 small ones (each copy costs more than its bytes).
 */
const blocks = new WeakMap<ChatMessage, Block>();

/**
 * The JSON of `messages` as the chat completions API takes them, comma-separated, as parts to join in
 * order. Messages must not change once given here: their bytes are kept with them.
 */
export function messagesWire(messages: readonly ChatMessage[]): Uint8Array[] {
  const parts: Uint8Array[] = [];
  // Messages not in a block yet, as JSON: encoded together, and kept as a block once there are enough.
  let loose: string[] = [];
  let looseStart = 0;
  const endLoose = () => {
    if (loose.length) parts.push(encoder.encode(loose.join('')));
    loose = [];
  };
  for (let i = 0; i < messages.length; ) {
    const block = blocks.get(messages[i]!);
    if (block && holds(messages, i, block.messages)) {
      endLoose();
      parts.push(block.bytes);
      i += block.messages.length;
      continue;
    }
    if (!loose.length) looseStart = i;
    loose.push(`,${wireJson(messages[i]!)}`);
    i++;
    if (loose.length === BLOCK_MESSAGES) {
      const made = { messages: messages.slice(looseStart, i), bytes: encoder.encode(loose.join('')) };
      blocks.set(made.messages[0]!, made);
      parts.push(made.bytes);
      loose = [];
    }
  }
  endLoose();
  // Each message's JSON follows the comma that separates it from the one before: the first has none.
  if (parts.length) parts[0] = parts[0]!.subarray(1);
  return parts;
}

/** Whether `messages` holds the block's messages, the same objects in the same order, from `start`. */
function holds(messages: readonly ChatMessage[], start: number, run: ChatMessage[]): boolean {
  if (start + run.length > messages.length) return false;
  for (let i = 0; i < run.length; i++) if (messages[start + i] !== run[i]) return false;
  return true;
}

/**
 * A message as the API takes it: only the fields of the wire format (callers may hand over richer
 * objects, such as stored rows); provider files go first, as file content parts of a user message.
 */
function wireJson({ role, content, fileIds }: ChatMessage): string {
  const files = role === 'user' && fileIds?.length ? fileIds.map((id) => ({ type: 'file', file: { file_id: id } })) : undefined;
  return JSON.stringify(files ? { role, content: [...files, { type: 'text', text: content }] } : { role, content });
}
