import { describe, expect, it } from 'vitest';
import { buildContext, type HistoryPage } from '../../src/modules/chat/context.js';
import { MESSAGE_OVERHEAD_TOKENS } from '../../src/providers/models.js';

async function* noHistory() {}

/** A turn of `prompts`, a one-token message and no files or history, within 1,000 tokens. */
const contextOf = (prompts: string[], countTokens: (text: string) => number | Promise<number>) =>
  buildContext({
    prompts: prompts.map((content) => ({ content })),
    filesSection: async () => undefined,
    history: noHistory,
    newMessage: { content: 'hello', tokens: 1 },
    budget: 1_000,
    promptTokens: ({ content }) => countTokens(content),
  });

describe('buildContext', () => {
  it('stops counting prompts once they pass the budget, and refuses the turn with what it counted', async () => {
    const counted: string[] = [];
    const prompts = Array.from({ length: 300 }, (_, i) => `prompt ${i}`);
    // Each prompt 100 tokens: the budget is passed by the tenth.
    const result = await contextOf(prompts, (text) => {
      counted.push(text);
      return 100;
    });
    expect(result).toEqual({ fits: false, requiredTokens: MESSAGE_OVERHEAD_TOKENS + 1 + 10 * (MESSAGE_OVERHEAD_TOKENS + 100) });
    expect(counted).toEqual(prompts.slice(0, 10));
  });

  it('counts every prompt of a turn that fits, counts given later included', async () => {
    const result = await contextOf(['a', 'b', 'c'], (text) => (text === 'b' ? Promise.resolve(100) : 100));
    expect(result).toMatchObject({ fits: true, promptTokens: MESSAGE_OVERHEAD_TOKENS + 1 + 3 * (MESSAGE_OVERHEAD_TOKENS + 100) });
  });
});

describe('buildContext with history', () => {
  /** A turn of `prompts` (2 tokens each) and a one-token `message`, no files, `history` within 1,000 tokens. */
  const contextWith = (history: () => AsyncIterable<HistoryPage>, prompts: string[], message: string) =>
    buildContext({
      prompts: prompts.map((content) => ({ content })),
      filesSection: async () => undefined,
      history,
      newMessage: { content: message, tokens: 1 },
      budget: 1_000,
      promptTokens: () => 2,
    });

  it('puts the pages oldest first between the prompts and the question, each page only as far as its count', async () => {
    const message = (content: string) => ({ role: 'user' as const, content, tokens: 1 });
    const [m6, m5, m4, m3, m2, m1] = ['6', '5', '4', '3', '2', '1'].map(message);
    async function* history() {
      yield { messages: [m6!, m5!], count: 2, tokens: 2 * (MESSAGE_OVERHEAD_TOKENS + 1) };
      // A cached window whose oldest two did not fit: they stay in the array, out of the page.
      yield { messages: [m4!, m3!, m2!, m1!], count: 2, tokens: 2 * (MESSAGE_OVERHEAD_TOKENS + 1) };
    }
    const result = await contextWith(history, ['be brief'], 'hello');
    expect(result).toEqual({
      fits: true,
      messages: [{ role: 'system', content: 'be brief' }, m3, m4, m5, m6, { role: 'user', content: 'hello' }],
      promptTokens: 6 * MESSAGE_OVERHEAD_TOKENS + 1 + 2 + 4,
      historyIncluded: 4,
    });
    // The messages themselves, not copies: an adapter keeps what it derives from each.
    if (result.fits) expect(result.messages[1]).toBe(m3);
  });

  it("leaves out an answer that the window would start with, its question left out by the budget", async () => {
    const user = (content: string) => ({ role: 'user' as const, content, tokens: 1 });
    const answer = (content: string) => ({ role: 'assistant' as const, content, tokens: 3 });
    const [a2, q2, a1] = [answer('a2'), user('q2'), answer('a1')];
    async function* history() {
      // Newest first; an empty page last (the budget ran out), then the page that reached a1, whose q1 did not fit.
      yield { messages: [a2!, q2!], count: 2, tokens: 2 * MESSAGE_OVERHEAD_TOKENS + 4 };
      yield { messages: [a1!], count: 1, tokens: MESSAGE_OVERHEAD_TOKENS + 3 };
      yield { messages: [], count: 0, tokens: 0 };
    }
    const result = await contextWith(history, [], 'q3');
    expect(result).toEqual({
      fits: true,
      messages: [q2, a2, { role: 'user', content: 'q3' }],
      promptTokens: 3 * MESSAGE_OVERHEAD_TOKENS + 1 + 4,
      historyIncluded: 2,
    });
  });
});
