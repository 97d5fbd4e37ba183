import { countTokens as cl100kCount } from 'gpt-tokenizer/encoding/cl100k_base';
import { countTokens as o200kCount } from 'gpt-tokenizer/encoding/o200k_base';
import { encodeChat } from 'gpt-tokenizer/model/gpt-4o';
import { describe, expect, it } from 'vitest';
import { CODE_POINTS_PER_ADDED_TOKEN, contextWindow, countTokens, countTokensPaced, MESSAGE_OVERHEAD_TOKENS, PACED_TEXT, REPLY_PRIMING_TOKENS } from '../../src/providers/models.js';

// Counts differently in the two encodings, so a test can tell which one was used.
const MIXED = 'Привет, мир! Comment ça va? 你好，世界。 function add(a, b) { return a + b; }';

describe('countTokens', () => {
  it('counts with the encoding of the model', () => {
    expect(o200kCount(MIXED)).not.toBe(cl100kCount(MIXED));
    expect(countTokens(MIXED, 'gpt-4o-mini')).toBe(o200kCount(MIXED));
    expect(countTokens(MIXED, 'gpt-4')).toBe(cl100kCount(MIXED));
    expect(countTokens(MIXED, 'gpt-3.5-turbo')).toBe(cl100kCount(MIXED));
  });

  it('knows a model behind a router vendor prefix or variant suffix', () => {
    expect(countTokens(MIXED, 'openai/gpt-4')).toBe(cl100kCount(MIXED));
    expect(countTokens(MIXED, 'openai/gpt-4:free')).toBe(cl100kCount(MIXED));
    expect(countTokens(MIXED, 'GPT-4')).toBe(cl100kCount(MIXED));
  });

  it("knows an OpenAI fine-tune by its base model: its encoding and its window", () => {
    for (const model of ['ft:gpt-4-0613:my-org::abc123', 'ft:gpt-3.5-turbo-0125:my-org:custom-suffix:id', 'openai/ft:gpt-4-0613:org::x']) {
      expect(countTokens(MIXED, model), model).toBe(cl100kCount(MIXED));
    }
    expect(contextWindow('ft:gpt-4-0613:my-org::abc123')).toBe(contextWindow('gpt-4-0613'));
    expect(contextWindow('ft:gpt-4o-mini-2024-07-18:org::id')).toBe(contextWindow('gpt-4o-mini-2024-07-18'));
    expect(contextWindow('gpt-4-0613')).toBeDefined();
  });

  it('counts unknown models with o200k_base', () => {
    for (const model of ['llama3.2:3b', 'anthropic/claude-sonnet-4', 'constructor', '__proto__', '']) {
      expect(countTokens(MIXED, model)).toBe(o200kCount(MIXED));
    }
  });

  it('counts special-token text as text instead of throwing', () => {
    expect(countTokens('a <|endoftext|> b <|im_start|>', 'gpt-4o')).toBeGreaterThan(4);
  });

  it('counts the empty string as 0', () => {
    expect(countTokens('', 'gpt-4o')).toBe(0);
  });

  it('counts long runs in slices, never under the exact count, and over it by a few tokens a slice at most', () => {
    const AS_TEXT = { disallowedSpecial: new Set<string>() };
    const letters = Array.from({ length: 3_000 }, (_, i) => String.fromCharCode(97 + ((i * 7919) % 26))).join('');
    const url = `see https://example.com/${'x'.repeat(400)}?q=${'y'.repeat(300)} for more`;
    const emoji = '😀🎉🚀'.repeat(500);
    const texts = [letters, url, emoji, ' '.repeat(5_000), `${'中文'.repeat(2_000)} and more`];
    // Long runs of whitespace and of anything else, cut into slices, next to what the encodings join them
    // with: a whitespace run's last character goes with the word after it (211 spaces then `:/` were
    // counted 3 tokens where they are 5), line breaks with punctuation before them, digits in threes.
    const runs = [' ', '\n', '\t', '\r\n', ' \n', '1', '9', 'a', 'Z', '-', '=', '/', '.', '中', '😀', 'é'];
    const joints = ['', ':/', ',3x', 'a', ' a', '.', '\n', '!', '12', "'s", 'B', '中', '😀', ' ', '\u3000'];
    let seed = 11;
    const random = (n: number) => ((seed = (seed * 48271) % 2147483647) % n);
    for (let sample = 0; sample < 400; sample++) {
      let text = '';
      for (let part = random(3) + 1; part > 0; part--) text += runs[random(runs.length)]!.repeat(100 + random(300)) + joints[random(joints.length)];
      texts.push(text);
    }
    for (const text of texts) {
      for (const [model, exactCount] of [['gpt-4o', o200kCount], ['gpt-4', cl100kCount]] as const) {
        const exact = exactCount(text, AS_TEXT);
        const counted = countTokens(text, model);
        expect(counted, `${model}: ${JSON.stringify(text.slice(0, 40))}… (${text.length})`).toBeGreaterThanOrEqual(exact);
        expect(counted - exact, `${model}: ${JSON.stringify(text.slice(0, 12))}… (${text.length}): ${counted} for ${exact}`).toBeLessThanOrEqual(4 * Math.ceil(text.length / 128));
      }
    }
  });

  it('counts a text at most its UTF-8 bytes and a token for each CODE_POINTS_PER_ADDED_TOKEN code points', () => {
    // Characters each byte of which is a token (no merge takes them), in runs counted in slices, the
    // slices of four-byte ones 64 code points long: a run of them was counted more than its bytes.
    const byteTokens = [String.fromCodePoint(0x2a6d6), String.fromCodePoint(0x30000), String.fromCodePoint(0xf0000)];
    const texts: string[] = [];
    for (const char of [...byteTokens, '😀', '中', 'é', 'x', ' ', '\n']) {
      for (const length of [1, 64, 65, 127, 128, 129, 130, 192, 193, 1_024, 3_000]) texts.push(char.repeat(length), `${char.repeat(length)} a`);
    }
    // Stretches with nowhere to cut (each forced cut a token more) between runs of them.
    texts.push(`${'a\n'.repeat(3_000)}${byteTokens[0]!.repeat(200)}`, `${byteTokens[1]!.repeat(129)} ${byteTokens[2]!.repeat(129)}`);
    for (const text of texts) {
      const bound = Buffer.byteLength(text) + Math.floor([...text].length / CODE_POINTS_PER_ADDED_TOKEN);
      for (const model of ['gpt-4o', 'gpt-4']) expect(countTokens(text, model), `${model}: ${JSON.stringify(text.slice(0, 6))}… (${text.length})`).toBeLessThanOrEqual(bound);
    }
    // What a token a byte alone would have let through.
    expect(countTokens(byteTokens[0]!.repeat(129), 'gpt-4o')).toBeGreaterThan(Buffer.byteLength(byteTokens[0]!.repeat(129)));
  });

  it('counts a run of ten million characters, which an unbounded pattern overflowed the stack on', () => {
    for (const char of ['x', ' ', '😀']) {
      const run = char.repeat(10_000_000);
      expect(countTokens(run, 'gpt-4o')).toBeGreaterThanOrEqual(10_000_000 / 128);
    }
  });

  it('counts a long text in pieces that add up to the count of the whole', () => {
    // Words, numbers, punctuation, and every kind of whitespace around them, in runs shorter than a
    // long run: the pieces are cut only where the text offers a place (see `cutsThere`).
    const parts = ['word', 'Word', 'WORD', "it's", "DON'T", '12345', '3.14', '...', '!?', '/', '://', '(a)', '—', 'é',
      '中文', 'Привет', '😀', '🇫🇷', '\u0301', '<|endoftext|>', ' ', '  ', '\t', '\n', '\r\n', '\r', ' \n', '\n\n', '\n ', ' \t\n',
      '\u00a0', '\u3000', '\u2028', '.\n', '/\n', ',\r\n'];
    const AS_TEXT = { disallowedSpecial: new Set<string>() };
    let seed = 7;
    const random = (n: number) => ((seed = (seed * 48271) % 2147483647) % n);
    for (let sample = 0; sample < 20; sample++) {
      let text = '';
      while (text.length < 5 * PACED_TEXT) text += parts[random(parts.length)];
      expect(countTokens(text, 'gpt-4o')).toBe(o200kCount(text, AS_TEXT));
      expect(countTokens(text, 'gpt-4')).toBe(cl100kCount(text, AS_TEXT));
    }
    const prose = 'The quick brown fox, it said, jumps over the lazy dog.\n\n  - a list item\n\tindented\r\n'.repeat(500);
    // Its only places to cut are before an indentation.
    const indented = '\tword\n  /\n'.repeat(2_000);
    for (const text of [prose, indented]) {
      expect(countTokens(text, 'gpt-4o')).toBe(o200kCount(text));
      expect(countTokens(text, 'gpt-4')).toBe(cl100kCount(text));
    }
  });

  it('counts a long text a piece at a time, letting other work run in between, to the same count', async () => {
    expect(countTokensPaced(MIXED, 'gpt-4o')).toBe(countTokens(MIXED, 'gpt-4o'));
    const printable = Array.from({ length: 100_000 }, (_, i) => String.fromCharCode(33 + ((i * 7919) % 94))).join('');
    const spaced = Array.from({ length: 800 }, (_, i) => `${'abcdefghij'.repeat(12).slice(i % 10)} `).join('');
    for (const text of [printable, spaced, '中文'.repeat(50_000), `${MIXED}\n`.repeat(2_000)]) {
      const turns = await turnsWhile(async () => {
        const counted = countTokensPaced(text, 'gpt-4o');
        expect(counted).toBeInstanceOf(Promise);
        expect(await counted).toBe(countTokens(text, 'gpt-4o'));
      });
      // A turn of the event loop for every PACED_TEXT characters or so, not one at the end.
      expect(turns).toBeGreaterThanOrEqual(Math.floor(text.length / (2 * PACED_TEXT)));
    }
  });

  it("lets other work run between short texts counted one after another, once a piece's worth is counted", async () => {
    const short = Array.from({ length: 100 }, (_, i) => `${i} ${'letters and a space every so often '.repeat(58)}`.slice(0, PACED_TEXT));
    const expected = short.map((text) => countTokens(text, 'gpt-4o'));
    await turnsWhile(async () => undefined); // a turn: nothing counted since
    const turns = await turnsWhile(async () => {
      const counts = [];
      // As a turn's prompts are counted: each awaited, one after another.
      for (const text of short) counts.push(await countTokensPaced(text, 'gpt-4o'));
      expect(counts).toEqual(expected);
    });
    // A turn of the event loop about every text (each is PACED_TEXT long), not one at the end.
    expect(turns).toBeGreaterThanOrEqual(short.length / 2);
  });

  it('stops counting once past a limit, having counted what fits and a piece more', async () => {
    const text = `${'word '.repeat(999)}word\n`.repeat(300); // 1.5 MB, 300,000 tokens
    const whole = countTokens(text, 'gpt-4o');
    expect(await countTokensPaced(text, 'gpt-4o', whole)).toBe(whole);
    expect(await countTokensPaced(text, 'gpt-4o', whole - 1)).toBeUndefined();
    // Short: counted at once, or after a turn of the event loop when much was counted since the last one.
    expect(await countTokensPaced('a few words', 'gpt-4o', 3)).toBe(3);
    expect(await countTokensPaced('a few words', 'gpt-4o', 2)).toBeUndefined();

    // Pieces are counted between turns of the event loop: the turns taken tell how much was counted.
    const turnsPast = (limit: number) => turnsWhile(async () => expect(await countTokensPaced(text, 'gpt-4o', limit)).toBeUndefined());
    // 1,000 tokens are about 5,000 characters, two or three pieces; the whole is over 700 pieces.
    expect(await turnsPast(1_000)).toBeLessThanOrEqual(4);
    expect(await turnsPast(whole - 1)).toBeGreaterThan(300);
  });

  it('matches the chat format overheads gpt-tokenizer applies', () => {
    const chat = [
      { role: 'system' as const, content: 'You are helpful.' },
      { role: 'user' as const, content: 'Hi there' },
      { role: 'assistant' as const, content: 'Hello! How can I help?' },
    ];
    const counted = chat.reduce((sum, message) => sum + countTokens(message.content, 'gpt-4o') + MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS);
    expect(counted).toBe(encodeChat(chat).length);
  });
});

/** The turns the event loop took while `work` ran. */
async function turnsWhile(work: () => Promise<void>): Promise<number> {
  let turns = 0;
  const tick = () => {
    turns++;
    timer = setImmediate(tick);
  };
  let timer = setImmediate(tick);
  try {
    await work();
  } finally {
    clearImmediate(timer);
  }
  return turns;
}

describe('contextWindow', () => {
  it('gives the context window of known models, prefixed or not', () => {
    expect(contextWindow('gpt-4o-mini')).toBe(128_000);
    expect(contextWindow('openai/gpt-4o-mini')).toBe(128_000);
    expect(contextWindow('gpt-4')).toBe(8_192);
  });

  it('gives undefined for unknown models and catalog entries without one', () => {
    for (const model of ['llama3.2', 'mistralai/mistral-7b-instruct', 'dall-e-3', 'constructor', '__proto__', 'toString']) {
      expect(contextWindow(model)).toBeUndefined();
    }
  });
});
