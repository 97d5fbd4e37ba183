import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ChatMessage } from '../../src/providers/types.js';
import { messagesWire } from '../../src/providers/wire-messages.js';

/** The messages as the body carries them: the joined parts, as a JSON array. */
function sent(messages: ChatMessage[]): unknown {
  return JSON.parse(`[${Buffer.concat(messagesWire(messages)).toString('utf8')}]`);
}

/** What the chat completions API takes for each message. */
function expected(messages: ChatMessage[]): unknown {
  return messages.map(({ role, content, fileIds }) =>
    role === 'user' && fileIds?.length
      ? { role, content: [...fileIds.map((id) => ({ type: 'file', file: { file_id: id } })), { type: 'text', text: content }] }
      : { role, content },
  );
}

const message = (i: number, role: ChatMessage['role'] = i % 2 ? 'assistant' : 'user'): ChatMessage => ({ role, content: `message ${i} «ünïcode» "quoted"` });

describe('messagesWire', () => {
  it('gives each message in the wire format only: its role and content, provider files first as parts of a user message', () => {
    const stored = { id: 'm1', role: 'assistant', content: 'from the database', tokens: 3, encoding: 'o200k_base' } as ChatMessage;
    const messages: ChatMessage[] = [
      { role: 'system', content: 'be brief', fileIds: ['ignored-on-system'] },
      stored,
      { role: 'user', content: 'read this', fileIds: ['file-1', 'file-2'] },
    ];
    expect(sent(messages)).toEqual([
      { role: 'system', content: 'be brief' },
      { role: 'assistant', content: 'from the database' },
      { role: 'user', content: [{ type: 'file', file: { file_id: 'file-1' } }, { type: 'file', file: { file_id: 'file-2' } }, { type: 'text', text: 'read this' }] },
    ]);
    expect(messagesWire([])).toEqual([]);
  });

  it('gives every turn its own messages in order, whatever runs of the same objects earlier turns sent', () => {
    // A pool of message objects kept between turns, as the history cache keeps them; each turn sends runs
    // of them (in order, reversed, with gaps) between messages made for that turn alone.
    const pool = Array.from({ length: 400 }, (_, i) => (i % 7 === 0 ? { ...message(i, 'user'), fileIds: [`file-${i}`] } : message(i)));
    const run = fc.record({ from: fc.nat(399), length: fc.nat(200), reversed: fc.boolean(), skip: fc.nat(3) });
    const turn = fc.record({ before: fc.nat(3), runs: fc.array(run, { maxLength: 4 }), after: fc.nat(3) });
    let fresh = 0;
    // System messages first, as a turn's context has them (prompts, files), made for each turn.
    const made = (count: number, role?: ChatMessage['role']) => Array.from({ length: count }, () => message(1_000 + fresh++, role));
    fc.assert(
      fc.property(fc.array(turn, { minLength: 1, maxLength: 6 }), (turns) => {
        const handed: { parts: Uint8Array[]; bytes: Buffer }[] = [];
        for (const { before, runs, after } of turns) {
          const messages = [...made(before, 'system')];
          for (const { from, length, reversed, skip } of runs) {
            const slice = pool.slice(from, from + length).filter((_, i) => i % (skip + 1) === 0);
            messages.push(...(reversed ? slice.reverse() : slice));
          }
          messages.push(...made(after));
          const parts = messagesWire(messages);
          expect(sent(messages)).toEqual(expected(messages));
          handed.push({ parts, bytes: Buffer.concat(parts) });
        }
        // What a turn was handed is never written over by the turns after it (a request may still be sending it).
        for (const { parts, bytes } of handed) expect(Buffer.concat(parts).equals(bytes)).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('sends a copy of a message sent before as what it is, with the same messages around it', () => {
    const [a, b, c] = [message(1), message(2), message(3)];
    expect(sent([a, b, c, message(4)])).toEqual(expected([a, b, c, message(4)]));
    // A copy carries what was kept with the message it copies, but is not that message.
    const copies = [{ ...a }, { ...b, content: 'changed' }, c, message(5)];
    expect(sent(copies)).toEqual(expected(copies));
    expect(sent([a, b, c, message(6)])).toEqual(expected([a, b, c, message(6)]));
  });

  it('keeps no more than a little of a long run for a window of a few of its messages', () => {
    const history = Array.from({ length: 6_000 }, (_, i) => message(i));
    messagesWire([...history, message(6_000)]);
    // A window of its oldest hundred, then of a hundred from its middle: each sent from a buffer of its own size.
    for (const window of [history.slice(0, 100), history.slice(3_000, 3_100)]) {
      const parts = messagesWire([...window, message(7_000)]);
      expect(sent([...window, message(7_000)])).toEqual(expected([...window, message(7_000)]));
      expect(parts[0]!.buffer.byteLength).toBeLessThan(1.1 * parts[0]!.length);
    }
  });

  it('sends frozen messages, which nothing can be kept with, as they are', () => {
    const frozen = [Object.freeze(message(1)), Object.freeze(message(2)), message(3)];
    expect(sent(frozen)).toEqual(expected(frozen));
    expect(sent([...frozen, message(4)])).toEqual(expected([...frozen, message(4)]));
  });

  it("sends a long history's next turn as a view of the bytes of the turns before, its two new messages added to them", () => {
    const history = Array.from({ length: 6_006 }, (_, i) => message(i));
    // Each turn: its prompt and question made for it, the two oldest messages left out for the budget,
    // and the question and answer of the turn before added.
    const turn = (n: number) => {
      const messages = [{ role: 'system' as const, content: 'be brief' }, ...history.slice(2 * n, 6_000 + 2 * n), message(6_000 + 2 * n, 'user')];
      const parts = messagesWire(messages);
      expect(sent(messages)).toEqual(expected(messages));
      return parts;
    };
    const turns = [0, 1, 2, 3].map(turn);
    // The prompt, the history as one view, and the question.
    for (const parts of turns) expect(parts).toHaveLength(3);
    const [, second, third, fourth] = turns.map((parts) => parts[1]!);
    // The second turn's history was copied once, with room to spare; the turns after it added to the same bytes.
    expect(third!.buffer).toBe(second!.buffer);
    expect(fourth!.buffer).toBe(second!.buffer);
    expect(fourth!.byteOffset).toBeGreaterThan(third!.byteOffset);
  });
});
