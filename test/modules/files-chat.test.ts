import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { buildFilesSection, type ContextFile, EntryCounts, MAX_BYTES_PER_TOKEN } from '../../src/modules/files/chat-section.js';
import type { FileDto } from '../../src/modules/files/schemas.js';
import { countTokens, countTokensPaced, MESSAGE_OVERHEAD_TOKENS } from '../../src/providers/models.js';
import { createProject, createPrompt, expectProblem, insertMessages, registerUser, type RegisteredUser, startTestApp, type TestApp } from '../support/app.js';
import { FakeUpstream } from '../support/fake-upstream.js';
import { type FormPart, multipart } from '../support/multipart.js';

const HEADER = 'Files attached to this project, newest first:';
const PDF = Buffer.concat([Buffer.from('%PDF-1.7\n'), Buffer.from([0xe2, 0xe3, 0xcf, 0xd3, 0x0a, 0x00, 0x01])]);
const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13]);

describe('the files section', () => {
  const countText = (text: string, limit: number) => countTokensPaced(text, 'gpt-4o-mini', limit);
  const wholeCount = (text: string) => countTokens(text, 'gpt-4o-mini');
  const textFile = (filename: string, text: string): ContextFile => ({
    id: `id of ${filename}`,
    filename,
    mimeType: 'text/plain',
    size: Buffer.byteLength(text),
    providerFileId: null,
    readText: vi.fn(async () => text),
  });
  const section = (files: ContextFile[], budget = 10_000, providerReadsFiles = true) =>
    buildFilesSection(files, { budget, countText, providerReadsFiles });

  it('is nothing without files', async () => {
    expect(await section([])).toBeUndefined();
  });

  it('holds whole text files under their names and counts its tokens exactly as they add up', async () => {
    const result = await section([textFile('b.txt', 'Bee.'), textFile('a.csv', 'x,y\n1,2\n')]);
    const content = `${HEADER}\n\n--- b.txt (text/plain) ---\nBee.\n\n--- a.csv (text/plain) ---\nx,y\n1,2\n`;
    expect(result).toEqual({ message: { role: 'system', content }, tokens: expect.any(Number), fileIds: [] });
    expect(result!.tokens).toBeGreaterThanOrEqual(wholeCount(content) + MESSAGE_OVERHEAD_TOKENS);
    expect(result!.tokens).toBeLessThanOrEqual(wholeCount(content) + MESSAGE_OVERHEAD_TOKENS + 2);
  });

  it('names a text file that does not fit as left out, and still takes older files that do', async () => {
    const big = textFile('big.txt', 'word '.repeat(2_000));
    const small = textFile('small.txt', 'Small enough.');
    const result = await section([big, small], 500);
    expect(result!.message.content).toBe(
      `${HEADER}\n\n--- big.txt (text/plain) ---\n[not included: too long for the context]\n\n--- small.txt (text/plain) ---\nSmall enough.`,
    );
    expect(result!.tokens).toBeLessThanOrEqual(500);
  });

  it('takes a text file of many bytes a token that fits: a table of dashes, an indented listing', async () => {
    const table = textFile('table.txt', `| a | b |\n${`${'-'.repeat(80)}\n`.repeat(30)}`);
    const listing = textFile('listing.txt', `${' '.repeat(120)}x\n`.repeat(20));
    for (const file of [table, listing]) {
      const text = await file.readText();
      // Past 16 bytes a token, which took it for too long; its tokens fit the section.
      expect(file.size / wholeCount(text)).toBeGreaterThan(16);
      const result = await section([file], wholeCount(text) + 100);
      expect(result!.message.content).toContain(text);
    }
  });

  it('does not read a text file that cannot fit, nor more bytes in all than the budget allows', async () => {
    const huge = textFile('huge.txt', 'x'.repeat(200_000));
    expect((await section([huge], 1_000))!.message.content).toContain('[not included: too long for the context]');
    expect(huge.readText).not.toHaveBeenCalled();

    // Each would fit what is left in bytes, but together they exceed what one turn reads.
    const files = Array.from({ length: 10 }, (_, i) => textFile(`${i}.txt`, 'y'.repeat(3_000)));
    await section(files, 1_000);
    const read = files.filter((file) => vi.mocked(file.readText).mock.calls.length > 0);
    expect(read.length * 3_000).toBeLessThanOrEqual(1_000 * MAX_BYTES_PER_TOKEN);
  });

  it('counts a text file only up to what is left: one that cannot fit is not counted whole', async () => {
    // Within the bytes a file may have (16 a token), far past the tokens: 1.5 MB of words, ~300,000 tokens.
    const lines = textFile('lines.txt', `${'word '.repeat(999)}word\n`.repeat(300));
    const oneLine = { ...textFile('one-line.json', JSON.stringify('word '.repeat(300_000))), mimeType: 'application/json' };
    for (const file of [lines, oneLine]) {
      const limits: number[] = [];
      const result = await buildFilesSection([file], {
        budget: 100_000,
        countText: (text, limit) => (limits.push(limit), countText(text, limit)),
        providerReadsFiles: false,
      });
      expect(result!.message.content).toContain('[not included: too long for the context]');
      // The file's entry was counted against what the header left (`countTokensPaced` stops there).
      expect(limits[1]).toBeLessThan(100_000);
      expect(limits[1]).toBeGreaterThan(99_000);
    }
    // One that fits is counted whole, in pieces that add up to the whole's count.
    const fits = await section([lines], 400_000);
    const whole = wholeCount(fits!.message.content) + MESSAGE_OVERHEAD_TOKENS;
    expect(fits!.tokens).toBeGreaterThanOrEqual(whole);
    expect(fits!.tokens).toBeLessThanOrEqual(whole + 1);
  });

  it('counts a file once: later turns take its count (read, not counted, when it fits; neither when it cannot)', async () => {
    const counts = new EntryCounts();
    const counted: string[] = [];
    const options = (budget: number, encoding = 'o200k_base') => ({
      budget,
      countText: (text: string, limit: number) => (counted.push(text), countText(text, limit)),
      providerReadsFiles: false,
      counted: { encoding, counts },
    });
    const fits = textFile('fits.txt', 'Some words that fit. '.repeat(100));
    const tooLong = textFile('long.txt', 'Far too many words. '.repeat(300));
    const first = await buildFilesSection([fits, tooLong], options(1_000));
    const countedFirst = counted.join('');
    expect(countedFirst).toContain('Some words that fit.');
    expect(countedFirst).toContain('Far too many words.');

    counted.length = 0;
    expect(await buildFilesSection([fits, tooLong], options(1_000))).toEqual(first);
    expect(counted.join('')).not.toContain('words'); // only the names of what is left out
    expect(fits.readText).toHaveBeenCalledTimes(2);
    expect(tooLong.readText).toHaveBeenCalledTimes(1);

    // With more room than it was found past, the long file is counted again, and then fits.
    const roomy = await buildFilesSection([fits, tooLong], options(100_000));
    expect(roomy!.message.content).toContain('Far too many words.');
    expect(roomy!.tokens).toBe((await section([fits, tooLong], 100_000))!.tokens);
    // Another encoding counts for itself.
    counted.length = 0;
    await buildFilesSection([fits], options(1_000, 'cl100k_base'));
    expect(counted.join('')).toContain('Some words that fit.');

    // The oldest counts go past the bound.
    const bounded = new EntryCounts(2);
    for (const id of ['a', 'b', 'c']) bounded.set(id, 'o200k_base', { tokens: 1 });
    expect(bounded.get('a', 'o200k_base')).toBeUndefined();
    expect(bounded.get('c', 'o200k_base')).toEqual({ tokens: 1 });
  });

  it('leaves out a text file deleted while the turn was read (its bytes gone), and takes the others', async () => {
    const gone = { ...textFile('gone.txt', 'Gone.'), readText: vi.fn(async () => Promise.reject(Object.assign(new Error('ENOENT: no such file'), { code: 'ENOENT' }))) };
    const result = await section([gone, textFile('kept.txt', 'Kept.')]);
    expect(result!.message.content).toBe(`${HEADER}\n\n--- kept.txt (text/plain) ---\nKept.`);
    const broken = { ...textFile('broken.txt', 'x'), readText: vi.fn(async () => Promise.reject(Object.assign(new Error('EIO'), { code: 'EIO' }))) };
    await expect(section([broken])).rejects.toThrow('EIO');
  });

  it('sends a PDF with a provider copy by reference, and names what the provider cannot read', async () => {
    const files: ContextFile[] = [
      { id: '1', filename: 'report.pdf', mimeType: 'application/pdf', size: 9, providerFileId: 'file-1', readText: vi.fn() },
      { id: '2', filename: 'photo.png', mimeType: 'image/png', size: 9, providerFileId: 'file-2', readText: vi.fn() },
      { id: '3', filename: 'local.pdf', mimeType: 'application/pdf', size: 9, providerFileId: null, readText: vi.fn() },
    ];
    const result = await section(files);
    expect(result!.message.content).toBe(
      `${HEADER}\n\n--- report.pdf (application/pdf) ---\n[attached to the latest user message]` +
        `\n\n--- photo.png (image/png) ---\n[not included: only its name and type are known]` +
        `\n\n--- local.pdf (application/pdf) ---\n[not included: only its name and type are known]`,
    );
    expect(result!.fileIds).toEqual(['file-1']);
    expect((await section(files, 10_000, false))!.fileIds).toEqual([]);
    for (const file of files) expect(file.readText).not.toHaveBeenCalled();
  });

  it('attaches PDFs up to OpenAI\'s 32 MB of files per request, newest first, and names the rest as left out', async () => {
    const pdf = (name: string, megabytes: number): ContextFile =>
      ({ id: name, filename: name, mimeType: 'application/pdf', size: megabytes * 1_000_000, providerFileId: `file-${name}`, readText: vi.fn() });
    // 20 + 15 MB would be refused whole (every turn of the project a 502); 20 + 10 fits.
    const result = await section([pdf('a.pdf', 20), pdf('b.pdf', 15), pdf('c.pdf', 10), pdf('d.pdf', 3)]);
    expect(result!.fileIds).toEqual(['file-a.pdf', 'file-c.pdf']);
    expect(result!.message.content).toBe(
      `${HEADER}\n\n--- a.pdf (application/pdf) ---\n[attached to the latest user message]` +
        `\n\n--- b.pdf (application/pdf) ---\n[not included: over the provider's limit for attached files]` +
        `\n\n--- c.pdf (application/pdf) ---\n[attached to the latest user message]` +
        `\n\n--- d.pdf (application/pdf) ---\n[not included: over the provider's limit for attached files]`,
    );
  });

  it('stops naming files once a name no longer fits, and is nothing when not even one does', async () => {
    const files = Array.from({ length: 50 }, (_, i) => ({ ...textFile(`file-${i}.bin`, ''), mimeType: 'application/octet-stream' }));
    const result = await section(files, 200);
    expect(result!.tokens).toBeLessThanOrEqual(200);
    const named = result!.message.content.match(/^--- /gm)!.length;
    expect(named).toBeGreaterThan(0);
    expect(named).toBeLessThan(50);
    expect(await section(files, 15)).toBeUndefined();
  });
});

describe('chat with files', () => {
  let fake: FakeUpstream;
  let t: TestApp;
  let user: RegisteredUser;

  beforeAll(async () => {
    fake = await FakeUpstream.start();
    t = await startTestApp({ OPENAI_API_KEY: 'sk-test-chat-files', OPENAI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini', AI_MAX_RETRIES: '1' });
    user = await registerUser(t.app);
  });
  afterAll(async () => {
    await t.close();
    await fake.close();
  });
  beforeEach(() => fake.reset());

  const upload = async (projectId: string, part: FormPart): Promise<FileDto> => {
    const { payload, headers } = multipart(part);
    const response = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/files`, headers: { ...user.auth, ...headers }, payload });
    expect(response.statusCode).toBe(201);
    return response.json();
  };
  const chat = (projectId: string, message: string) =>
    t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: user.auth, payload: { message } });
  const lastChatRequest = () => fake.requests.filter((request) => request.path === '/v1/chat/completions').at(-1)!;

  it('answers from an uploaded text file: its content reaches the provider after the prompts', async () => {
    const projectId = (await createProject(t.app, user)).id;
    await createPrompt(t.app, user, projectId, { content: 'Answer from the files.' });
    await upload(projectId, { filename: 'codes.md', type: 'text/markdown', content: 'The launch code is 4321.\n' });
    fake.enqueue({ content: 'The launch code is 4321.' });

    const response = await chat(projectId, 'What is the launch code?');
    expect(response.statusCode).toBe(200);
    expect(response.json().assistantMessage.content).toBe('The launch code is 4321.');
    expect(lastChatRequest().body.messages).toEqual([
      { role: 'system', content: 'Answer from the files.' },
      { role: 'system', content: `${HEADER}\n\n--- codes.md (text/markdown) ---\nThe launch code is 4321.\n` },
      { role: 'user', content: 'What is the launch code?' },
    ]);
  });

  it('names the question it stored when a file cannot be read for the context, marked failed, JSON and streamed alike', async () => {
    const projectId = (await createProject(t.app, user)).id;
    const file = await upload(projectId, { filename: 'notes.txt', type: 'text/plain', content: 'Some notes.' });
    // Its bytes unreadable (a folder where they were: EISDIR), as a failing disk would make them.
    const bytes = join(t.config.DATA_DIR, 'files', projectId, file.id);
    rmSync(bytes);
    mkdirSync(bytes);
    for (const stream of [false, true]) {
      const message = `What do my notes say? (${stream ? 'streamed' : 'JSON'})`;
      const response = await t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: user.auth, payload: { message, stream } });
      const problem = expectProblem(response, 500, 'INTERNAL');
      const history = (await t.app.inject({ method: 'GET', url: `/api/v1/projects/${projectId}/messages`, headers: user.auth })).json().data;
      expect(history.find((stored: { id: string }) => stored.id === problem.userMessageId)).toMatchObject({ role: 'user', content: message, status: 'failed' });
    }
    expect(fake.requests.filter((request) => request.path === '/v1/chat/completions')).toHaveLength(0);
    // The disk mended: the next turn sends neither unanswered question, no two questions in a row.
    rmSync(bytes, { recursive: true });
    writeFileSync(bytes, 'Some notes.');
    expect((await chat(projectId, 'And now?')).statusCode).toBe(200);
    expect((lastChatRequest().body.messages as { role: string }[]).filter((sent) => sent.role === 'user')).toEqual([{ role: 'user', content: 'And now?' }]);
  });

  it('sends a PDF by its provider file id as a file part of the new message, and names an image only', async () => {
    const projectId = (await createProject(t.app, user)).id;
    const pdf = await upload(projectId, { filename: 'report.pdf', type: 'application/pdf', content: PDF });
    await upload(projectId, { filename: 'photo.png', type: 'image/png', content: PNG });
    expect(pdf.providerFileId).toMatch(/^file-/);

    await chat(projectId, 'Summarise the report.');
    expect(lastChatRequest().body.messages).toEqual([
      {
        role: 'system',
        content:
          `${HEADER}\n\n--- photo.png (image/png) ---\n[not included: only its name and type are known]` +
          `\n\n--- report.pdf (application/pdf) ---\n[attached to the latest user message]`,
      },
      {
        role: 'user',
        content: [
          { type: 'file', file: { file_id: pdf.providerFileId } },
          { type: 'text', text: 'Summarise the report.' },
        ],
      },
    ]);
  });

  it.each([false, true])('answers a turn whose PDF is deleted while it waits on the provider, without the PDF (stream: %s)', async (stream) => {
    fake.setDefault({ asOpenAI: true });
    const projectId = (await createProject(t.app, user)).id;
    const pdf = await upload(projectId, { filename: 'report.pdf', type: 'application/pdf', content: PDF });
    // The provider asks the turn to wait a second; the PDF and its copy are deleted meanwhile.
    fake.enqueue({ status: 429, retryAfter: 1 });
    const answer = t.app.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: user.auth, payload: { message: 'Summarise the report.', stream } });
    await fake.waitForRequests(2);
    const deleted = await t.app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}/files/${pdf.id}`, headers: user.auth });
    expect(deleted.statusCode).toBe(204);
    expect(fake.files.has(pdf.providerFileId!)).toBe(false);

    const response = await answer;
    expect(response.statusCode).toBe(200);
    expect(response.body).toContain(stream ? 'event: done' : '"assistantMessage"');
    expect(response.body).not.toContain('event: error');
    expect(lastChatRequest().body.messages).toEqual([
      { role: 'system', content: `${HEADER}\n\n--- report.pdf (application/pdf) ---\n[attached to the latest user message]` },
      { role: 'user', content: 'Summarise the report.' },
    ]);
  });

  it('fails a turn that the provider refuses while its PDF is still there, asking once', async () => {
    const projectId = (await createProject(t.app, user)).id;
    await upload(projectId, { filename: 'report.pdf', type: 'application/pdf', content: PDF });
    fake.enqueue({ status: 400 });
    expect((await chat(projectId, 'Summarise the report.')).statusCode).toBe(502);
    expect(fake.requests.filter((request) => request.path === '/v1/chat/completions')).toHaveLength(1);
  });

  it('gives files their place before history: the oldest history is left out first', async () => {
    // gpt-4 has an 8,192-token window: 7,165 tokens for the request after the reply's share.
    const projectId = (await createProject(t.app, user, { model: 'gpt-4' })).id;
    const facts = Array.from({ length: 1_000 }, (_, i) => `fact ${i}`).join('\n');
    await upload(projectId, { filename: 'facts.txt', type: 'text/plain', content: facts });
    await insertMessages(t.testDb.database.db, projectId, 40, { content: 'history '.repeat(100) });

    expect((await chat(projectId, 'Which facts?')).statusCode).toBe(200);
    const messages = lastChatRequest().body.messages as { role: string; content: string }[];
    expect(messages[0]).toEqual({ role: 'system', content: `${HEADER}\n\n--- facts.txt (text/plain) ---\n${facts}` });
    const history = messages.slice(1, -1);
    expect(history.length).toBeGreaterThan(0);
    expect(history.length).toBeLessThan(40);
    expect(messages.at(-1)).toEqual({ role: 'user', content: 'Which facts?' });
  });

  it('sends no section, and the same context as before, for a project without files', async () => {
    const projectId = (await createProject(t.app, user)).id;
    await chat(projectId, 'Hello');
    expect(lastChatRequest().body.messages).toEqual([{ role: 'user', content: 'Hello' }]);
  });
});
