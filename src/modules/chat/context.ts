import { MESSAGE_OVERHEAD_TOKENS } from '../../providers/models.js';
import type { ChatMessage } from '../../providers/types.js';
import type { FilesSection } from '../files/chat-section.js';

export interface HistoryMessage {
  id: string;
  role: 'user' | 'assistant' | 'system';
  content: string;
  /** An answer's question; null for a question, and for an answer stored before answers named theirs (the message before it is). */
  replyTo: string | null;
  /** The tokens of `content`, framing not included. */
  tokens: number;
}

/** Messages newest first, and the tokens they take in a request, each one's framing included. */
export interface HistoryPage {
  /** Newest first: the page is the first `count` of them, so that a cached window cut short is not copied to be cut. */
  messages: readonly HistoryMessage[];
  count: number;
  tokens: number;
}

export interface ContextInput<P extends { content: string } = { content: string }> {
  /** The project's system prompts, oldest first. */
  prompts: P[];
  /** The project's files as one system message that fits in `budget` tokens; undefined when none do. */
  filesSection(budget: number): Promise<FilesSection | undefined>;
  /**
   * Stored history, newest first, a page at a time, read lazily so that only what fits is ever fetched;
   * `room` is the budget the history may take, and the pages hold only what fits in it, together. Read
   * to their end.
   */
  history(room: number): AsyncIterable<HistoryPage>;
  /** The new message and the tokens of its content. */
  newMessage: { content: string; tokens: number };
  /** Tokens available for the request: the model's context minus what is kept for the reply. */
  budget: number;
  /** Tokens of a prompt's content; a promise when counting them took long enough to let other work run after it. */
  promptTokens(prompt: P): number | Promise<number>;
}

export type ContextResult =
  | { fits: true; messages: ChatMessage[]; promptTokens: number; historyIncluded: number }
  /** `requiredTokens`: at least this many (what was counted before the budget was passed). */
  | { fits: false; requiredTokens: number };

/**
 * The messages sent to the provider: prompts as system messages, then the files section, then as much
 * of the newest history as fits, oldest first, then the new message once. The oldest history is left
 * out first; prompts and the new message never are: when they alone exceed the budget the result says
 * so. The files section comes before history: it gets what prompts and message leave, history the rest.
 */
export async function buildContext<P extends { content: string }>(input: ContextInput<P>): Promise<ContextResult> {
  const system: ChatMessage[] = input.prompts.map(({ content }) => ({ role: 'system', content }));
  const question: ChatMessage = { role: 'user', content: input.newMessage.content };
  let used = MESSAGE_OVERHEAD_TOKENS + input.newMessage.tokens;
  for (const prompt of input.prompts) {
    // Counted only until the budget is passed: the turn is refused whatever the rest hold, and a project
    // may have many long prompts, whose counting would hold the event loop for every user of the process.
    if (used > input.budget) break;
    used += MESSAGE_OVERHEAD_TOKENS + (await input.promptTokens(prompt));
  }
  if (used > input.budget) return { fits: false, requiredTokens: used };

  const files = await input.filesSection(input.budget - used);
  if (files) {
    system.push(files.message);
    used += files.tokens;
    if (files.fileIds.length) question.fileIds = files.fileIds;
  }

  const pages: HistoryPage[] = [];
  let historyIncluded = 0;
  for await (const page of input.history(input.budget - used)) {
    used += page.tokens;
    historyIncluded += page.count;
    pages.push(page);
  }
  // The messages themselves, not copies, oldest first: a long history's are kept between turns, and so
  // is what an adapter derives from each (its wire form). Written into one array of the request's
  // length: joining the pages, then the prompts, the history and the question, made two arrays of a
  // window's length (6,046 messages in benchmark figure 8) and took three to four times as long.
  const messages = new Array<ChatMessage>(system.length + historyIncluded + 1);
  let at = 0;
  for (const message of system) messages[at++] = message;
  for (let p = pages.length - 1; p >= 0; p--) {
    const page = pages[p]!;
    for (let i = page.count - 1; i >= 0; i--) messages[at++] = page.messages[i]!;
  }
  const paired = pairAnswers(messages as HistoryMessage[], system.length, at);
  used -= paired.leftOutTokens;
  historyIncluded -= at - paired.end;
  messages.length = paired.end + 1;
  messages[paired.end] = question;
  return { fits: true, messages, promptTokens: used, historyIncluded };
}

/**
 * Puts each answer of the history `messages[from..to)` (oldest first) right after its own question, in
 * place, and leaves out what has no partner in it: the answer its window would start with, its question
 * left out by the budget, and a question with no answer (its turn still running, or ended by a crash
 * before it could store one or mark it failed). Turns of one project that ran at once are stored in the
 * order each message came (Q1, Q2, A1, A2): sent so, a model reads each answer after the wrong question,
 * and some chat templates refuse the conversation outright (Mistral's and Gemma's, behind vLLM or
 * llama.cpp: roles must alternate, and a first turn be a user's). Where the new end is, and the tokens of
 * what was left out, framing included.
 */
function pairAnswers(messages: HistoryMessage[], from: number, to: number): { end: number; leftOutTokens: number } {
  let first = from;
  while (first < to && inPlace(messages, from, to, first)) first++;
  if (first === to) return { end: to, leftOutTokens: 0 };
  // Only the stretch from the first message out of place to the last is rearranged: around it every
  // question is followed by its answer already.
  let last = to - 1;
  while (inPlace(messages, from, to, last)) last--;
  const stretch = messages.slice(first, last + 1);
  // Each question's answer: the one that names it; else, for an answer of before answers named theirs
  // (an instance of before them, in a rolling deploy), the question right before it, unless another names it.
  const answers = new Map<string, HistoryMessage>();
  for (const message of stretch) if (message.role === 'assistant' && message.replyTo !== null && !answers.has(message.replyTo)) answers.set(message.replyTo, message);
  stretch.forEach((message, i) => {
    const before = stretch[i - 1];
    if (message.role === 'assistant' && message.replyTo === null && before?.role === 'user' && !answers.has(before.id)) answers.set(before.id, message);
  });
  const written = new Set<HistoryMessage>();
  let end = first;
  let leftOutTokens = 0;
  for (const message of stretch) {
    const answer = message.role === 'user' ? answers.get(message.id) : undefined;
    if (message.role === 'system' || answer) messages[end++] = message;
    if (answer) {
      messages[end++] = answer;
      written.add(answer);
    } else if (message.role !== 'system' && !written.has(message)) {
      leftOutTokens += MESSAGE_OVERHEAD_TOKENS + message.tokens;
    }
  }
  messages.copyWithin(end, last + 1, to);
  return { end: end + to - (last + 1), leftOutTokens };
}

/** Whether `messages[i]` is where it belongs in `messages[from..to)`: a question right before its answer, an answer right after its question. */
function inPlace(messages: HistoryMessage[], from: number, to: number, i: number): boolean {
  const message = messages[i]!;
  if (message.role === 'user') {
    const next = i + 1 < to ? messages[i + 1]! : undefined;
    return next?.role === 'assistant' && (next.replyTo ?? message.id) === message.id;
  }
  if (message.role === 'assistant') {
    const previous = i > from ? messages[i - 1]! : undefined;
    return previous?.role === 'user' && (message.replyTo ?? previous.id) === previous.id;
  }
  return true;
}
