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

  /** A stored question, and an answer naming its question (null: stored before answers named theirs). */
  const user = (id: string, tokens = 1) => ({ id, role: 'user' as const, content: id, replyTo: null, tokens });
  const answer = (id: string, replyTo: string | null, tokens = 3) => ({ id, role: 'assistant' as const, content: id, replyTo, tokens });
  /** The history `stored` (oldest first) as pages of one message each, newest first, all of them within the budget. */
  const pagesOf = (stored: HistoryPage['messages'][number][]) =>
    async function* history() {
      for (const message of [...stored].reverse()) yield { messages: [message], count: 1, tokens: MESSAGE_OVERHEAD_TOKENS + message.tokens };
    };
  const text = (result: Awaited<ReturnType<typeof contextWith>>) => (result.fits ? result.messages.map((m) => m.content) : []);

  it('puts the pages oldest first between the prompts and the question, each page only as far as its count', async () => {
    const [a3, q3, a2, q2, a1, q1] = [answer('a3', 'q3', 1), user('q3'), answer('a2', null, 1), user('q2'), answer('a1', 'q1', 1), user('q1')];
    async function* history() {
      yield { messages: [a3, q3], count: 2, tokens: 2 * (MESSAGE_OVERHEAD_TOKENS + 1) };
      // A cached window whose oldest two did not fit: they stay in the array, out of the page.
      yield { messages: [a2, q2, a1, q1], count: 2, tokens: 2 * (MESSAGE_OVERHEAD_TOKENS + 1) };
    }
    const result = await contextWith(history, ['be brief'], 'hello');
    expect(result).toEqual({
      fits: true,
      messages: [{ role: 'system', content: 'be brief' }, q2, a2, q3, a3, { role: 'user', content: 'hello' }],
      promptTokens: 6 * MESSAGE_OVERHEAD_TOKENS + 1 + 2 + 4,
      historyIncluded: 4,
    });
    // The messages themselves, not copies: an adapter keeps what it derives from each.
    if (result.fits) expect(result.messages[1]).toBe(q2);
  });

  it('leaves out an answer that the window would start with, its question left out by the budget', async () => {
    for (const replyTo of ['q1', null]) {
      const [a2, q2, a1] = [answer('a2', replyTo && 'q2'), user('q2'), answer('a1', replyTo)];
      async function* history() {
        // Newest first; an empty page last (the budget ran out), then the page that reached a1, whose q1 did not fit.
        yield { messages: [a2, q2], count: 2, tokens: 2 * MESSAGE_OVERHEAD_TOKENS + 4 };
        yield { messages: [a1], count: 1, tokens: MESSAGE_OVERHEAD_TOKENS + 3 };
        yield { messages: [], count: 0, tokens: 0 };
      }
      const result = await contextWith(history, [], 'q3');
      expect(result).toEqual({
        fits: true,
        messages: [q2, a2, { role: 'user', content: 'q3' }],
        promptTokens: 3 * MESSAGE_OVERHEAD_TOKENS + 1 + 4,
        historyIncluded: 2,
      });
    }
  });

  // Two turns at once are stored Q1, Q2, A1, A2: each answer goes back to the model after its own question.
  it('pairs each answer with its own question when turns ran at once, whatever order they were stored in', async () => {
    const stored = [user('q1'), user('q2'), answer('a2', 'q2'), user('q3'), answer('a1', 'q1'), answer('a3', 'q3'), user('q4'), answer('a4', 'q4')];
    const result = await contextWith(pagesOf(stored), [], 'q5');
    expect(text(result)).toEqual(['q1', 'a1', 'q2', 'a2', 'q3', 'a3', 'q4', 'a4', 'q5']);
    expect(result).toMatchObject({ promptTokens: 9 * MESSAGE_OVERHEAD_TOKENS + 4 * 1 + 4 * 3 + 1, historyIncluded: 8 });
  });

  // A turn still running (another request's, at once) or one a crash ended before it stored an answer or
  // marked its question failed: sent, its question would stand unanswered before the next one.
  it('leaves out a question that has no answer, and the tokens it took', async () => {
    const stored = [user('q1'), answer('a1', 'q1'), user('orphan'), user('q2'), answer('a2', 'q2'), user('running')];
    const result = await contextWith(pagesOf(stored), [], 'q3');
    expect(text(result)).toEqual(['q1', 'a1', 'q2', 'a2', 'q3']);
    expect(result).toMatchObject({ promptTokens: 5 * MESSAGE_OVERHEAD_TOKENS + 2 * 1 + 2 * 3 + 1, historyIncluded: 4 });
  });

  it('pairs answers stored before answers named their questions with the question right before each', async () => {
    const stored = [user('q1'), answer('a1', null), user('q2'), answer('a2', null), user('q3'), answer('a3', 'q3')];
    expect(text(await contextWith(pagesOf(stored), [], 'q4'))).toEqual(['q1', 'a1', 'q2', 'a2', 'q3', 'a3', 'q4']);
    // An answer of before, after another answer: it answered nothing that is shown.
    const odd = [user('q1'), answer('a1', null), answer('a1b', null), user('q2'), answer('a2', null)];
    expect(text(await contextWith(pagesOf(odd), [], 'q3'))).toEqual(['q1', 'a1', 'q2', 'a2', 'q3']);
    // One of before, in a rolling deploy, beside answers that name their questions: those are theirs.
    const mixed = [user('q0'), user('q1'), answer('old', null), answer('a1', 'q1'), answer('a0', 'q0'), user('q2'), answer('a2', 'q2')];
    expect(text(await contextWith(pagesOf(mixed), [], 'q3'))).toEqual(['q0', 'a0', 'q1', 'a1', 'q2', 'a2', 'q3']);
  });
});
