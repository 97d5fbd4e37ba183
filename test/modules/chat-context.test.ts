import { describe, expect, it } from 'vitest';
import { buildContext } from '../../src/modules/chat/context.js';
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
