import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createRequire } from 'node:module';
import { closeSync, mkdtempSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { standardOutput } from '../../src/http/standard-output.js';

const MODULE = resolve('src/http/standard-output.ts');
const PINO = createRequire(import.meta.url).resolve('pino');

/**
 * Runs `body` in a process of its own whose log goes to standard output through `standardOutput()`
 * (`log`, a pino logger), standard output a pipe read here, from `readFrom`: at once, after some
 * milliseconds (a slow reader), or once the process has exited (a stalled one). What it printed, line by
 * line.
 */
async function printed(body: string, readFrom: number | 'exit' = 0): Promise<string[]> {
  const child = spawn(process.execPath, ['--import', 'tsx', scriptLogging(body)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const closed = once(child, 'close');
  // Read through 'readable', not 'data': Node discards what a child printed into a stream nobody listens
  // to once the child exits.
  let text = '';
  let reading = false;
  const read = () => {
    for (let chunk: string | null; reading && (chunk = child.stdout.read() as string | null) !== null; ) text += chunk;
  };
  child.stdout.setEncoding('utf8').on('readable', read);
  if (readFrom === 'exit') await once(child, 'exit');
  else await sleep(readFrom);
  reading = true;
  read();
  await closed;
  return text.split('\n').filter(Boolean);
}

/** A script in a directory of its own that runs `body` with `log`, a pino logger writing through `standardOutput()`. */
function scriptLogging(body: string): string {
  const script = join(mkdtempSync(join(tmpdir(), 'standard-output-')), 'script.ts');
  writeFileSync(
    script,
    `import pino from ${JSON.stringify(PINO)};
import { standardOutput } from ${JSON.stringify(MODULE)};
// Made non-blocking, as anything that touches process.stdout makes it (tsx does): a full pipe then
// takes part of a write and refuses the rest (EAGAIN) instead of holding the process.
void process.stdout;
const log = pino({ level: 'info', base: null, timestamp: false }, standardOutput());
${body}
`,
  );
  return script;
}

/**
 * Runs the script `body(file)` makes with its standard output a new file, opened with `flags`: the
 * file, and what the script printed to standard error.
 */
async function runWithOutputTo(flags: 'w' | 'r', body: (file: string) => string, env: Record<string, string> = {}) {
  const file = join(mkdtempSync(join(tmpdir(), 'standard-output-')), 'log');
  writeFileSync(file, '');
  const output = openSync(file, flags);
  const child = spawn(process.execPath, ['--import', 'tsx', scriptLogging(body(file))], {
    stdio: ['ignore', output, 'pipe'],
    env: { ...process.env, ...env },
  });
  closeSync(output); // the child holds its own
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  await once(child, 'close');
  return { file, stderr };
}

/** The log's lines in `text`, without anything else a process printed there (a warning of Node's). */
const logLines = (text: string) => text.split('\n').filter((line) => line.startsWith('{'));

const numbers = (lines: string[]) => lines.map((line) => (JSON.parse(line) as { i: number }).i);

const PAD = 'x'.repeat(200);

describe("the log's standard output", () => {
  it('writes every line of the turn that ends in process.exit, past what a pipe takes at once', async () => {
    // 2,000 lines of 250 bytes: 500 KB, where a pipe holds 64 KB.
    const lines = await printed(`setTimeout(() => {
  for (let i = 0; i < 2000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
  process.exit(1);
}, 20);`);
    expect(numbers(lines)).toEqual([...Array(2000).keys()]);
  });

  it('writes at exit the lines a full pipe refused and that waited to be tried again, in order', async () => {
    // Logged, refused by the pipe nobody reads yet, then the process exits; its reader starts 300 ms in.
    const lines = await printed(
      `setTimeout(() => {
  for (let i = 0; i < 2000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
  setTimeout(() => process.exit(0), 50);
}, 20);`,
      300,
    );
    expect(numbers(lines)).toEqual([...Array(2000).keys()]);
  });

  it('exits, what the pipe took written, when nobody reads it', async () => {
    // Its exit does not wait for a reader: the test would never end.
    const lines = await printed(
      `for (let i = 0; i < 2000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
setTimeout(() => process.exit(0), 50);`,
      'exit',
    );
    // From the first, as much as the pipe held (64 KB: over 250 lines). Its end may be cut where the pipe
    // was full, or follow a write that the thread pool still had as the process ended.
    expect(numbers(lines.slice(0, 200))).toEqual([...Array(200).keys()]);
  });

  it('keeps the lines of a turn that logs past its bound up to the bound, and goes on logging', async () => {
    // 20 Mi characters (ASCII: bytes) in one turn: the first 16 Mi kept, not the turn dropped whole.
    const lines = await printed(`for (let i = 0; i < 80000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
setTimeout(() => log.info('after'), 200);`);
    const kept = numbers(lines.slice(0, -1));
    expect(kept.length).toBeGreaterThan(60_000);
    expect(kept.length).toBeLessThan(80_000);
    expect(kept).toEqual([...Array(kept.length).keys()]);
    expect(JSON.parse(lines.at(-1)!)).toMatchObject({ msg: 'after' });
  });

  it('writes to a file by the end of the turn, not through the thread pool', async () => {
    // The pool's one thread busy for a tenth of a second or more: a write handed to it would wait that long. The
    // script reads its own standard output two turns after logging, and prints what it read to
    // standard error.
    const { file, stderr } = await runWithOutputTo(
      'w',
      (file) => `import { pbkdf2 } from 'node:crypto';
import { readFileSync } from 'node:fs';
pbkdf2('password', 'salt', 500_000, 32, 'sha256', () => {});
for (let i = 0; i < 3; i++) log.info({ i }, 'line');
setImmediate(() => setImmediate(() => {
  process.stderr.write(readFileSync(${JSON.stringify(file)}, 'utf8'));
  process.exit(0);
}));`,
      { UV_THREADPOOL_SIZE: '1' },
    );
    expect(numbers(logLines(stderr))).toEqual([0, 1, 2]);
    expect(numbers(logLines(readFileSync(file, 'utf8')))).toEqual([0, 1, 2]);
  });

  it('writes to a file every line of the turn that ends in process.exit', async () => {
    const { file } = await runWithOutputTo(
      'w',
      () => `setTimeout(() => {
  for (let i = 0; i < 2000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
  process.exit(1);
}, 20);`,
    );
    expect(numbers(logLines(readFileSync(file, 'utf8')))).toEqual([...Array(2000).keys()]);
  });

  it('stops the log, said once, and goes on when the file refuses a write', async () => {
    // Standard output a file opened for reading: every write fails (EBADF).
    const { stderr } = await runWithOutputTo(
      'r',
      () => `log.info('first');
setTimeout(() => log.info('second'), 20);
setTimeout(() => { console.error('still running'); process.exit(0); }, 60);`,
    );
    expect(stderr.match(/the log stopped: standard output failed \(EBADF/g)).toHaveLength(1);
    expect(stderr).toContain('still running');
  });

  it('is one per process, with one hook at exit, however many apps ask for it', () => {
    const first = standardOutput();
    const hooks = process.listenerCount('exit');
    expect(standardOutput()).toBe(first);
    expect(process.listenerCount('exit')).toBe(hooks);
  });
});
