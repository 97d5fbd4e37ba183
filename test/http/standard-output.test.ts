import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createRequire } from 'node:module';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { standardOutput } from '../../src/http/standard-output.js';

const MODULE = resolve('src/http/standard-output.ts');
const PINO = createRequire(import.meta.url).resolve('pino');

/**
 * Runs `body` in a process of its own whose log goes to standard output through `standardOutput()`
 * (`log`, a pino logger), standard output a pipe read here: what the process printed, line by line.
 */
async function printed(body: string): Promise<string[]> {
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
  const child = spawn(process.execPath, ['--import', 'tsx', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let text = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
  await once(child, 'close');
  return text.split('\n').filter(Boolean);
}

const PAD = 'x'.repeat(200);

describe("the log's standard output", () => {
  it('writes every line of the turn that ends in process.exit, past what a pipe takes at once', async () => {
    // 2,000 lines of 250 bytes: 500 KB, where a pipe holds 64 KB.
    const lines = await printed(`setTimeout(() => {
  for (let i = 0; i < 2000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
  process.exit(1);
}, 20);`);
    expect(lines).toHaveLength(2000);
    expect(lines.map((line) => (JSON.parse(line) as { i: number }).i)).toEqual([...Array(2000).keys()]);
  });

  it('keeps the lines of a turn that logs past its bound up to the bound, and goes on logging', async () => {
    // 20 MiB in one turn: the first 16 MiB kept, not the turn dropped whole.
    const lines = await printed(`for (let i = 0; i < 80000; i++) log.info({ i, pad: ${JSON.stringify(PAD)} }, 'line');
setTimeout(() => log.info('after'), 200);`);
    const kept = lines.slice(0, -1).map((line) => (JSON.parse(line) as { i: number }).i);
    expect(kept.length).toBeGreaterThan(60_000);
    expect(kept.length).toBeLessThan(80_000);
    expect(kept).toEqual([...Array(kept.length).keys()]);
    expect(JSON.parse(lines.at(-1)!)).toMatchObject({ msg: 'after' });
  });

  it('is one per process, with one hook at exit, however many apps ask for it', () => {
    const first = standardOutput();
    const hooks = process.listenerCount('exit');
    expect(standardOutput()).toBe(first);
    expect(process.listenerCount('exit')).toBe(hooks);
  });
});
