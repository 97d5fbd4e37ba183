import { createHash, randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { type AddressInfo, connect, createServer } from 'node:net';
import { basename, join } from 'node:path';
import { PassThrough } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { eq, inArray, sql } from 'drizzle-orm';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/app.js';
import { openPostgres } from '../../src/db/database.js';
import { deletedProjects, files, projects, providerFileDeletions } from '../../src/db/schema.js';
import { NotFound } from '../../src/http/errors.js';
import { ContentInspector } from '../../src/modules/files/content-type.js';
import { attachmentDisposition, displayFilename } from '../../src/modules/files/filename.js';
import { ProviderCopies } from '../../src/modules/files/provider-copies.js';
import type { ByteRange } from '../../src/modules/files/ranges.js';
import type { FileDto } from '../../src/modules/files/schemas.js';
import { FilesService } from '../../src/modules/files/service.js';
import { type FileStorage, LocalDiskStorage } from '../../src/modules/files/storage.js';
import { createProviders } from '../../src/providers/registry.js';
import { createProject, expectProblem, registerUser, type RegisteredUser, revokeTokens, startTestApp, type TestApp, testConfig } from '../support/app.js';
import { expectDeleteFreesOneSlot, expectFull, expectOneOfManyIntoTheLastSlot, type Holder } from '../support/limits.js';
import { refusingWrites } from '../support/database.js';
import { FakeUpstream } from '../support/fake-upstream.js';
import { expectCreateListedAfterDeletedNewest } from '../support/deleted-newest.js';
import { expectWaitingCreateListedLast } from '../support/waiting-create.js';
import { logCollector } from '../support/logs.js';
import { seriesValue } from '../support/metrics.js';
import { BOUNDARY, CLOSING, type FormPart, multipart, partHead } from '../support/multipart.js';
import { rawRequest, statusLines } from '../support/raw-http.js';

const LIMIT = 256 * 1024;
const execFileAsync = promisify(execFile);

let fake: FakeUpstream;
let t: TestApp;
let user: RegisteredUser;
let storageRoot: string;
let baseUrl: string;

/** The app's environment: OPENAI_BASE_URL keeps the OpenAI provider (and its Files API) while pointing it at the fake. */
const appEnv = () => ({
  OPENAI_API_KEY: 'sk-test-files',
  OPENAI_BASE_URL: fake.url,
  AI_MODEL: 'gpt-4o-mini',
  AI_TIMEOUT_MS: '5000',
  AI_MAX_RETRIES: '0',
  FILE_MAX_BYTES: String(LIMIT),
});

beforeAll(async () => {
  fake = await FakeUpstream.start();
  t = await startTestApp(appEnv());
  storageRoot = join(t.config.DATA_DIR, 'files');
  baseUrl = await t.app.listen({ port: 0, host: '127.0.0.1' });
  user = await registerUser(t.app);
});
afterAll(async () => {
  await t.close();
  await fake.close();
});
beforeEach(async () => {
  fake.reset();
  // The copies a test's provider failed to delete are the fake's of that test, which forgets them.
  await t.testDb.database.db.delete(providerFileDeletions);
});

const newProject = async (owner: RegisteredUser = user, body: Record<string, unknown> = {}) => (await createProject(t.app, owner, body)).id;
const filesUrl = (projectId: string, rest = '') => `/api/v1/projects/${projectId}/files${rest}`;

function send(projectId: string, body: { payload: Buffer; headers: Record<string, string> }, owner: RegisteredUser = user) {
  return t.app.inject({ method: 'POST', url: filesUrl(projectId), headers: { ...owner.auth, ...body.headers }, payload: body.payload });
}

async function upload(projectId: string, content: string | Uint8Array, part: Omit<FormPart, 'content'> = {}): Promise<FileDto> {
  const response = await send(projectId, multipart({ filename: 'notes.txt', type: 'text/plain', ...part, content }));
  if (response.statusCode !== 201) throw new Error(`upload failed: ${response.statusCode} ${response.body}`);
  const file: FileDto = response.json();
  expect(response.headers.location).toBe(filesUrl(file.projectId, `/${file.id}`));
  return file;
}

const get = (url: string, owner: RegisteredUser = user) => t.app.inject({ method: 'GET', url, headers: owner.auth });
const remove = (url: string, owner: RegisteredUser = user) => t.app.inject({ method: 'DELETE', url, headers: owner.auth });
const rowsOf = (projectId: string) => t.testDb.database.db.select().from(files).where(eq(files.projectId, projectId));
/** The provider copies queued for deletion, with their tries and the seconds until the next. */
async function queuedCopies(): Promise<{ providerFileId: string; attempts: number; waitSeconds: number }[]> {
  const { providerFileId, attempts, dueAt } = providerFileDeletions;
  return t.testDb.database.db
    .select({ providerFileId, attempts, waitSeconds: sql<number>`extract(epoch from ${dueAt} - now())::float8` })
    .from(providerFileDeletions)
    .orderBy(providerFileId);
}
/** As if the queued copies' waits were over. */
const endWaits = () => t.testDb.database.db.update(providerFileDeletions).set({ dueAt: sql`now()` });
/** What another instance does when it starts (and every minute): one sweep of the queued copies that are due. Resolves with its log lines. */
async function sweepOnce(env: Record<string, string> = {}): Promise<Record<string, unknown>[]> {
  const logs = logCollector();
  const config = testConfig({ ...appEnv(), ...env, LOG_LEVEL: 'debug', DATA_DIR: t.config.DATA_DIR });
  const instance = await buildApp(config, { database: t.testDb.database, logStream: logs.stream });
  try {
    // Its end is logged, whatever it did ("removed …", or "could not remove …"); closing would cut it short.
    await waitFor(() => logs.lines.some((line) => String(line.msg).endsWith('the provider copies of deleted files')));
  } finally {
    await instance.close();
  }
  return logs.lines;
}
/** One sweep deletes the file's provider copy upstream, and the queue is empty after it. */
async function expectSweptAway(file: FileDto): Promise<void> {
  await sweepOnce();
  expect(fake.files.has(file.providerFileId!)).toBe(false);
  expect(await queuedCopies()).toEqual([]);
}
const sha256 = (bytes: string | Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/** Every stored file's path under the storage root (by default the app's), temporary ones included. */
function storedPaths(root = storageRoot): string[] {
  if (!existsSync(root)) return [];
  return readdirSync(root, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => join(entry.parentPath, entry.name).slice(root.length + 1));
}
const stagedPaths = () => storedPaths().filter((path) => path.startsWith('tmp/'));

/** An upload over HTTP whose file is sent in two parts: `finish` sends the second and resolves with the answer. */
function uploadInTwo(projectId: string, part: Omit<FormPart, 'content'>, first: Buffer, { server = baseUrl, owner = user } = {}) {
  let finish!: (rest: Buffer) => Promise<{ statusCode: number; body: string }>;
  const answered = new Promise<{ statusCode: number; body: string }>((resolve, reject) => {
    const req = httpRequest(`${server}${filesUrl(projectId)}`, {
      method: 'POST',
      headers: { ...owner.auth, 'content-type': `multipart/form-data; boundary=${BOUNDARY}` },
    });
    req.on('error', reject);
    req.on('response', (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve({ statusCode: res.statusCode!, body: text }));
    });
    req.write(Buffer.concat([partHead(part), first]));
    finish = (rest) => {
      req.end(Buffer.concat([rest, Buffer.from('\r\n'), CLOSING]));
      return answered;
    };
  });
  return { finish };
}

describe('upload and download', () => {
  it('stores a text file under ids, copies it to the provider and gives back the exact bytes', async () => {
    const projectId = await newProject();
    const content = '# Notes\n\nThe launch code is 4321. Ünïcödé ✓\n';
    const file = await upload(projectId, content, { filename: 'notes.md', type: 'text/markdown' });

    expect(file).toEqual({
      id: expect.any(String),
      projectId,
      filename: 'notes.md',
      mimeType: 'text/markdown',
      size: Buffer.byteLength(content),
      sha256: sha256(content),
      providerFileId: expect.stringMatching(/^file-/),
      createdAt: expect.any(String),
    });
    expect(fake.requests).toHaveLength(1);
    expect(fake.requests[0]).toMatchObject({ method: 'POST', path: '/v1/files', body: { purpose: 'user_data', filename: 'notes.md' } });
    expect(fake.requests[0]!.headers.authorization).toBe('Bearer sk-test-files');
    expect(fake.files.get(file.providerFileId!)!.bytes.toString()).toBe(content);

    const [row] = await rowsOf(projectId);
    expect(row!.storageUrl).toBe(`file://${join(storageRoot, projectId, file.id)}`);
    expect(readFileSync(fileURLToPath(row!.storageUrl), 'utf8')).toBe(content);
    expect(storedPaths()).toContain(`${projectId}/${file.id}`);

    expect((await get(filesUrl(projectId, `/${file.id}`))).json()).toEqual(file);
    const download = await get(filesUrl(projectId, `/${file.id}/content`));
    expect(download.statusCode).toBe(200);
    expect(download.body).toBe(content);
    expect(download.headers).toMatchObject({
      'content-type': 'text/markdown; charset=utf-8',
      'content-length': String(Buffer.byteLength(content)),
      'content-disposition': `attachment; filename="notes.md"; filename*=UTF-8''notes.md`,
      'x-content-type-options': 'nosniff',
    });
  });

  // A client that hangs up the moment it has Content-Length's bytes (curl does) was counted and logged
  // as one that left before its answer (499) about one time in ten: the file's stream had given its last
  // bytes but not yet found its end, which took one more read.
  it('counts a download whose client hangs up once it has every byte as answered, not abandoned', async () => {
    const projectId = await newProject();
    const bytes = randomBytes(200 * 1024);
    const file = await upload(projectId, bytes, { filename: 'data.bin', type: 'application/octet-stream' });
    const route = { route: '/api/v1/projects/:projectId/files/:fileId/content' };
    const counted = async (status: string) => seriesValue((await t.app.inject({ method: 'GET', url: '/metrics' })).body, 'http_request_duration_seconds_count', { ...route, status });
    const [answeredBefore, abandonedBefore] = [await counted('200'), await counted('499')];
    const { port } = new URL(baseUrl);
    const downloads = 100;
    for (let i = 0; i < downloads; i++) {
      const received = await new Promise<Buffer>((resolve, reject) => {
        const socket = connect(Number(port), '127.0.0.1', () =>
          socket.write(`GET ${filesUrl(projectId, `/${file.id}/content`)} HTTP/1.1\r\nhost: x\r\nauthorization: ${user.auth.authorization}\r\n\r\n`),
        );
        let head = Buffer.alloc(0);
        socket.on('data', (chunk: Buffer) => {
          head = Buffer.concat([head, chunk]);
          const end = head.indexOf('\r\n\r\n');
          if (end === -1 || head.length - end - 4 < bytes.length) return;
          socket.destroy();
          resolve(head.subarray(end + 4));
        });
        socket.on('error', reject);
      });
      expect(received.equals(bytes)).toBe(true);
    }
    await sleep(100);
    expect(await counted('499')).toBe(abandonedBefore);
    expect(await counted('200')).toBe(answeredBefore + downloads);
  });

  it("answers HEAD on the content with the download's headers and no body, never reading the bytes", async () => {
    const projectId = await newProject();
    // Over the 1 KiB from which answers are compressed.
    const text = 'the bytes '.repeat(300);
    const file = await upload(projectId, text, { filename: 'notes.txt', type: 'text/plain' });
    const url = filesUrl(projectId, `/${file.id}/content`);
    // A client that takes compressed answers too: the download goes as uploaded, its length known.
    const headers = { ...user.auth, 'accept-encoding': 'gzip' };
    const download = await t.app.inject({ method: 'GET', url, headers });
    expect(download.body).toBe(text);
    const head = () => t.app.inject({ method: 'HEAD', url, headers });
    const answer = await head();
    expect(answer.statusCode).toBe(200);
    expect(answer.body).toBe('');
    for (const name of ['content-type', 'content-length', 'content-disposition', 'x-content-type-options', 'content-encoding', 'vary']) {
      expect(answer.headers[name], name).toBe(download.headers[name]);
    }
    expect(answer.headers['content-length']).toBe(String(file.size));

    // Bytes read by this process (Linux counts them in /proc/self/io), around a HEAD of a large file.
    if (!existsSync('/proc/self/io')) return;
    const bytesRead = () => Number(/^rchar: (\d+)$/m.exec(readFileSync('/proc/self/io', 'utf8'))![1]);
    writeFileSync(join(storageRoot, projectId, file.id), Buffer.alloc(16 * 1024 * 1024, 'x'));
    const before = bytesRead();
    expect((await head()).statusCode).toBe(200);
    await sleep(200); // a stream left flowing would go on reading after the answer
    expect(bytesRead() - before).toBeLessThan(1024 * 1024);
  });

  it('answers a range of the bytes with 206, and a client that has them with 304, by their ETag', async () => {
    const projectId = await newProject();
    const bytes = randomBytes(10_000);
    const file = await upload(projectId, bytes, { filename: 'blob.bin', type: 'application/octet-stream' });
    const url = filesUrl(projectId, `/${file.id}/content`);
    const tag = `"${file.sha256}"`;
    const ask = (headers: Record<string, string>, method: 'GET' | 'HEAD' = 'GET') => t.app.inject({ method, url, headers: { ...user.auth, ...headers } });

    const whole = await ask({});
    expect(whole.headers).toMatchObject({ etag: tag, 'accept-ranges': 'bytes', 'cache-control': 'private, no-cache' });
    for (const [range, start, end] of [
      ['bytes=0-99', 0, 99],
      ['bytes=9990-', 9990, 9999],
      ['bytes=-10', 9990, 9999],
      ['bytes=9000-20000', 9000, 9999],
      ['bytes=-50000', 0, 9999],
      ['BYTES= 5-5', 5, 5],
      // Empty list elements, which a recipient must take (RFC 9110 §5.6.1), as some clients send them.
      ['bytes=0-1,', 0, 1],
      ['bytes=, 7-8 ,', 7, 8],
    ] as const) {
      const part = await ask({ range });
      expect(part.statusCode, range).toBe(206);
      expect(part.rawPayload.equals(bytes.subarray(start, end + 1)), range).toBe(true);
      expect(part.headers, range).toMatchObject({
        'content-range': `bytes ${start}-${end}/10000`,
        'content-length': String(end - start + 1),
        'content-type': 'application/octet-stream',
        etag: tag,
      });
      // With an If-Range of these bytes, the same; of other bytes (or a date), the whole file.
      expect((await ask({ range, 'if-range': tag })).statusCode).toBe(206);
      for (const other of ['"0000"', `W/${tag}`, 'Sat, 05 Dec 2026 16:00:00 GMT']) {
        const instead = await ask({ range, 'if-range': other });
        expect([instead.statusCode, instead.rawPayload.equals(bytes)], other).toEqual([200, true]);
      }
    }
    // What it does not read (several ranges, another unit, nonsense, a backwards range) gets the whole file.
    for (const range of ['bytes=0-1,5-6', 'items=0-1', 'bytes=abc', 'bytes=-', 'bytes=5-1']) {
      const answer = await ask({ range });
      expect([answer.statusCode, answer.rawPayload.equals(bytes), answer.headers['content-range']], range).toEqual([200, true, undefined]);
    }
    // A range past the end: 416 problem+json, naming the size.
    for (const range of ['bytes=10000-', 'bytes=20000-30000', 'bytes=-0']) {
      const refused = expectProblem(await ask({ range }), 416, 'RANGE_NOT_SATISFIABLE');
      expect(refused.detail, range).toContain('10000');
      expect((await ask({ range })).headers['content-range'], range).toBe('bytes */10000');
    }
    // HEAD tells what the whole GET would, ranges aside.
    const head = await ask({ range: 'bytes=0-99' }, 'HEAD');
    expect([head.statusCode, head.headers['content-length'], head.headers.etag]).toEqual([200, '10000', tag]);

    // The client that has the bytes: 304 and no body, for its tag among others, weak or not, or for *.
    for (const ifNoneMatch of [tag, `"other", W/${tag}`, '*']) {
      for (const method of ['GET', 'HEAD'] as const) {
        const unchanged = await ask({ 'if-none-match': ifNoneMatch, range: 'bytes=0-1' }, method);
        expect([unchanged.statusCode, unchanged.body, unchanged.headers.etag, unchanged.headers['cache-control']], `${method} ${ifNoneMatch}`).toEqual([
          304,
          '',
          tag,
          'private, no-cache',
        ]);
      }
    }
    expect((await ask({ 'if-none-match': '"other"' })).rawPayload.equals(bytes)).toBe(true);

    // If-Match, compared strongly and before anything else: these bytes or 412.
    for (const ifMatch of [tag, `"other", ${tag}`, '*']) expect((await ask({ 'if-match': ifMatch })).statusCode, ifMatch).toBe(200);
    for (const ifMatch of ['"other"', `W/${tag}`]) {
      for (const more of [{}, { 'if-none-match': tag }, { range: 'bytes=0-1' }] as Record<string, string>[]) {
        expectProblem(await ask({ 'if-match': ifMatch, ...more }), 412, 'PRECONDITION_FAILED');
      }
    }
  });

  it('answers a range of an empty file with 416, but for its last bytes, which are all of it: nothing', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, '', { filename: 'empty.txt', type: 'text/plain' });
    const url = filesUrl(projectId, `/${file.id}/content`);
    const ask = (range: string) => t.app.inject({ method: 'GET', url, headers: { ...user.auth, range } });
    for (const range of ['bytes=0-', 'bytes=0-10', 'bytes=-0']) {
      const response = await ask(range);
      expectProblem(response, 416, 'RANGE_NOT_SATISFIABLE');
      expect(response.headers['content-range']).toBe('bytes */0');
    }
    const last = await ask('bytes=-1');
    expect([last.statusCode, last.body, last.headers['content-length']]).toEqual([200, '', '0']);
  });

  it('gives back random binary bytes, NUL bytes included, byte for byte', async () => {
    const projectId = await newProject();
    const bytes = Buffer.concat([Buffer.alloc(64), randomBytes(100_000), Buffer.from([0, 0xff, 0, 0xfe])]);
    const file = await upload(projectId, bytes, { filename: 'blob.bin', type: 'application/octet-stream' });
    expect(file).toMatchObject({ mimeType: 'application/octet-stream', size: bytes.length, sha256: sha256(bytes) });
    expect(fake.files.get(file.providerFileId!)!.bytes.equals(bytes)).toBe(true);

    const download = await get(filesUrl(projectId, `/${file.id}/content`));
    expect(download.rawPayload.equals(bytes)).toBe(true);
    expect(download.headers['content-type']).toBe('application/octet-stream');
  });

  it('takes a file of exactly FILE_MAX_BYTES', async () => {
    const projectId = await newProject();
    const bytes = randomBytes(LIMIT);
    const file = await upload(projectId, bytes, { type: 'application/octet-stream' });
    expect(file.size).toBe(LIMIT);
    expect((await get(filesUrl(projectId, `/${file.id}/content`))).rawPayload.equals(bytes)).toBe(true);
  });

  it.each([
    ['one byte over FILE_MAX_BYTES', LIMIT + 1],
    ['far over FILE_MAX_BYTES', LIMIT * 8],
  ])('refuses a file %s with 413 and stores nothing', async (_, size) => {
    const projectId = await newProject();
    const response = await send(projectId, multipart({ filename: 'big.bin', type: 'application/octet-stream', content: Buffer.alloc(size, 7) }));
    const problem = expectProblem(response, 413, 'PAYLOAD_TOO_LARGE');
    expect(problem.detail).toContain(String(LIMIT));
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(storedPaths().filter((path) => path.startsWith(projectId) || path.startsWith('tmp/'))).toEqual([]);
    expect(fake.requests).toHaveLength(0);
  });

  it('writes the bytes to disk as they arrive, never holding the whole upload', async () => {
    const projectId = await newProject();
    const first = randomBytes(160 * 1024);
    const rest = randomBytes(80 * 1024);
    const sending = uploadInTwo(projectId, { filename: 'stream.bin', type: 'application/octet-stream' }, first);
    // The first part is on disk, in a temporary file, while the rest has not even been sent.
    await waitFor(() => stagedPaths().some((path) => statSync(join(storageRoot, path)).size >= 128 * 1024));
    const { statusCode, body } = await sending.finish(rest);
    expect(statusCode).toBe(201);
    const file = JSON.parse(body) as FileDto;
    expect(file).toMatchObject({ size: first.length + rest.length, sha256: sha256(Buffer.concat([first, rest])) });
    expect(stagedPaths()).toEqual([]);
  });
});

describe('a client that waits for 100 Continue before its body (Expect: 100-continue, as curl sends)', () => {
  /** Sends the head of a request with `Expect: 100-continue`; the first line the server answers before any body, and the socket. */
  async function headAwaitingContinue(path: string, headers: Record<string, string>, body: Buffer) {
    const socket = connect(Number(new URL(baseUrl).port), '127.0.0.1');
    const lines = Object.entries({ host: 'localhost', ...headers, expect: '100-continue', 'content-length': String(body.length) }).map(([name, value]) => `${name}: ${value}\r\n`);
    socket.write(`POST ${path} HTTP/1.1\r\n${lines.join('')}\r\n`);
    let received = '';
    socket.on('data', (chunk: Buffer) => (received += chunk.toString('latin1')));
    await expect.poll(() => received.includes('\r\n'), { timeout: 5_000 }).toBe(true);
    return { first: received.split('\r\n')[0], socket, received: () => received };
  }

  it('is refused before it sends the bytes of an upload that cannot be kept: no token, not its project (checked with its room)', async () => {
    const form = multipart({ filename: 'big.bin', type: 'application/octet-stream', content: Buffer.alloc(LIMIT - 1024) });
    const stranger = await registerUser(t.app);
    for (const [projectId, auth, refusal] of [
      [await newProject(user), {}, 'HTTP/1.1 401'],
      [await newProject(stranger), user.auth, 'HTTP/1.1 404'],
    ] as const) {
      const { first, socket, received } = await headAwaitingContinue(filesUrl(projectId), { ...auth, ...form.headers }, form.payload);
      // And its connection closed (Node's doing): it was told not to send the body it declared.
      await expect.poll(() => received().includes('\r\n\r\n'), { timeout: 5_000 }).toBe(true);
      socket.destroy();
      expect(first).toMatch(new RegExp(`^${refusal} `));
      expect(received().toLowerCase()).toContain('\r\nconnection: close\r\n');
    }
  });

  it('is told to go on once the upload can be kept, and a JSON body once its token is checked', async () => {
    const form = multipart({ filename: 'notes.txt', type: 'text/plain', content: 'Some notes' });
    const uploading = await headAwaitingContinue(filesUrl(await newProject(user)), { ...user.auth, ...form.headers }, form.payload);
    const json = Buffer.from(JSON.stringify({ name: 'Continued' }));
    const creating = await headAwaitingContinue('/api/v1/projects', { ...user.auth, 'content-type': 'application/json' }, json);
    for (const [request, body, status] of [[uploading, form.payload, '201'], [creating, json, '201']] as const) {
      expect(request.first).toBe('HTTP/1.1 100 Continue');
      request.socket.write(body);
      await expect.poll(() => request.received().includes(`HTTP/1.1 ${status} `), { timeout: 5_000 }).toBe(true);
      request.socket.destroy();
    }
  });
});

describe('the provider copy', () => {
  it('keeps the file with providerFileId null when the provider upload fails', async () => {
    fake.setDefault({ status: 500 });
    const projectId = await newProject();
    const file = await upload(projectId, 'still mine');
    expect(file.providerFileId).toBeNull();
    expect(fake.requests.map((r) => r.path)).toEqual(['/v1/files']);
    expect((await rowsOf(projectId))[0]!.providerFileId).toBeNull();
    expect((await get(filesUrl(projectId, `/${file.id}/content`))).body).toBe('still mine');
  });

  // Its copy is queued, due a day later, before its row is written: a row the database may not have
  // written (the connection lost with the insert in flight, a crash) left a copy no sweep could find.
  it('deletes the copy of an upload whose row may not have been written, a day later, and keeps one that a row names', async () => {
    const projectId = await newProject();
    const kept = await upload(projectId, 'confirmed');
    await refusingWrites(
      t.testDb.database.db,
      'before insert on files',
      async () => {
        expectProblem(await send(projectId, multipart({ filename: 'lost.txt', type: 'text/plain', content: 'unconfirmed' })), 503, 'SERVICE_UNAVAILABLE');
      },
      { error: "'connection lost' using errcode = '57P01'" },
    );
    const lost = [...fake.files.keys()].find((id) => id !== kept.providerFileId)!;
    // The confirmed copy left the queue with its row's insert (migration 0017). Left in it until this
    // code's sweep saw the row, it was deleted a day later by the sweep of an instance of before the
    // reservations (a rolling deploy, a rollback), which deletes whatever is due, looking for no row.
    expect((await queuedCopies()).map(({ providerFileId, waitSeconds }) => [providerFileId, Math.round(waitSeconds / 3600)])).toEqual([[lost, 24]]);
    await endWaits();
    await sweepOnce();
    expect([...fake.files.keys()]).toEqual([kept.providerFileId]);
    expect(await queuedCopies()).toEqual([]);
  });

  // Refused for want of room (507), as its deletion's queueing then is: the copy was kept for good.
  it('deletes the copy of an upload the database has no room for, though it cannot queue its deletion', async () => {
    const projectId = await newProject();
    const db = t.testDb.database.db;
    const diskFull = { error: "'disk full' using errcode = '53100'" };
    await refusingWrites(
      db,
      'before insert on files',
      () =>
        refusingWrites(
          db,
          'before insert or update on provider_file_deletions',
          async () => {
            expectProblem(await send(projectId, multipart({ filename: 'big.txt', type: 'text/plain', content: 'no room' })), 507, 'INSUFFICIENT_STORAGE');
          },
          diskFull,
        ),
      diskFull,
    );
    expect(fake.requests.map((request) => request.method)).toEqual(['POST', 'DELETE']);
    expect(fake.files.size).toBe(0);
    expect(await rowsOf(projectId)).toEqual([]);
  });

  it('makes none for a project whose provider has no Files API here', async () => {
    const projectId = await newProject(user, { provider: 'openrouter' });
    expect((await upload(projectId, 'local only')).providerFileId).toBeNull();
    expect(fake.requests).toHaveLength(0);
  });
});

describe('delete', () => {
  it('removes the row, the bytes and the provider copy', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'to be deleted');
    const path = join(storageRoot, projectId, file.id);
    expect(existsSync(path)).toBe(true);

    expect((await remove(filesUrl(projectId, `/${file.id}`))).statusCode).toBe(204);
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(existsSync(path)).toBe(false);
    expect(fake.requests.at(-1)).toMatchObject({ method: 'DELETE', path: `/v1/files/${file.providerFileId}` });
    expect(fake.files.size).toBe(0);

    expectProblem(await get(filesUrl(projectId, `/${file.id}`)), 404, 'NOT_FOUND');
    expectProblem(await get(filesUrl(projectId, `/${file.id}/content`)), 404, 'NOT_FOUND');
    expectProblem(await remove(filesUrl(projectId, `/${file.id}`)), 404, 'NOT_FOUND');
  });

  it('is 404, never 500, for a download whose file a DELETE removes between its row and its bytes', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'going');
    // The app's own storage, but for the one moment that matters: the download has read the row, and a
    // whole DELETE (row, then bytes) runs before it opens the bytes.
    const disk = new LocalDiskStorage(storageRoot);
    let deleted: number | undefined;
    const storage: FileStorage = Object.assign(Object.create(disk) as LocalDiskStorage, {
      open: async (key: string, range?: ByteRange) => {
        deleted = (await remove(filesUrl(projectId, `/${file.id}`))).statusCode;
        return disk.open(key, range);
      },
    });
    const db = t.testDb.database.db;
    const providers = createProviders(t.config);
    const service = new FilesService(db, storage, providers, new ProviderCopies(db, providers, t.config), t.config);

    const { open } = await service.content(user.id, projectId, file.id);
    await expect(open()).rejects.toBeInstanceOf(NotFound);
    expect(deleted).toBe(204);
    expect(await rowsOf(projectId)).toEqual([]);
  });

  it('fails (500, logged with the file and the path looked in) on an instance whose DATA_DIR lacks a recorded file\'s bytes, and takes it for no deleted file', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'only on the first instance');
    // A second instance of the same database, its DATA_DIR not the first's: a replica without the shared volume.
    const logs = logCollector();
    const config = testConfig({ ...appEnv(), LOG_LEVEL: 'info' });
    const replica = await buildApp(config, { database: t.testDb.database, logStream: logs.stream });
    try {
      const download = await replica.inject({ method: 'GET', url: filesUrl(projectId, `/${file.id}/content`), headers: user.auth });
      expectProblem(download, 500, 'INTERNAL');
      expect(download.body).not.toContain(config.DATA_DIR);
      const chat = await replica.inject({ method: 'POST', url: `/api/v1/projects/${projectId}/chat`, headers: user.auth, payload: { message: 'What do my notes say?' } });
      expectProblem(chat, 500, 'INTERNAL');
      expect(chat.json()).toMatchObject({ userMessageId: expect.any(String) });
      expect(fake.requests.filter((request) => request.path === '/v1/chat/completions')).toEqual([]);

      // An error's message as logged carries its causes': the chat's failure, the bytes missing, the path.
      const errors = logs.lines.filter((line) => line.level === 50).map((line) => (line.err as { message: string }).message);
      expect(errors).toHaveLength(2);
      for (const message of errors) {
        expect(message).toContain(`file ${file.id} is recorded but its bytes are missing`);
        expect(message).toContain(join(config.DATA_DIR, 'files', projectId, file.id));
      }
    } finally {
      await replica.close();
    }
    // Nothing of it was taken for gone: the file is listed and served where its bytes are.
    expect((await get(filesUrl(projectId, `/${file.id}`))).statusCode).toBe(200);
    expect((await get(filesUrl(projectId, `/${file.id}/content`))).body).toBe('only on the first instance');
  });

  it('finds and removes the bytes of a file uploaded through its project id in capitals', async () => {
    const projectId = await newProject();
    const file = await upload(projectId.toUpperCase(), 'spelled loudly');
    expect(file.projectId).toBe(projectId);
    const download = await get(filesUrl(projectId, `/${file.id}/content`));
    expect(download.statusCode).toBe(200);
    expect(download.body).toBe('spelled loudly');
    expect((await remove(filesUrl(projectId, `/${file.id}`))).statusCode).toBe(204);
    expect(storedPaths().filter((path) => path.includes(file.id))).toEqual([]);
  });

  it('still deletes when the provider copy cannot be deleted, and deletes the copy later, waiting longer after each failure', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'provider down later');
    fake.setDefault({ status: 500 });
    expect((await remove(filesUrl(projectId, `/${file.id}`))).statusCode).toBe(204);
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(existsSync(join(storageRoot, projectId, file.id))).toBe(false);

    // Queued with the row's deletion: tried once, the next try in 30 s.
    expect(await queuedCopies()).toEqual([{ providerFileId: file.providerFileId, attempts: 1, waitSeconds: expect.closeTo(30, -1) }]);
    // Its wait over, an instance's sweep tries again: the provider still fails, and the wait doubles.
    await endWaits();
    await sweepOnce();
    expect(await queuedCopies()).toEqual([{ providerFileId: file.providerFileId, attempts: 2, waitSeconds: expect.closeTo(60, -1) }]);
    expect(fake.files.has(file.providerFileId!)).toBe(true);
    // Not due yet: a sweep leaves it alone.
    const calls = fake.requests.length;
    await sweepOnce();
    expect(fake.requests).toHaveLength(calls);

    fake.setDefault({});
    await endWaits();
    await expectSweptAway(file);
  });

  it('gives up on a copy the provider refuses for good (400, 422), saying so once, and keeps trying those it may yet delete', async () => {
    for (const status of [400, 422, 401, 403, 429, 500]) {
      await t.testDb.database.db.delete(providerFileDeletions);
      fake.setDefault({});
      const projectId = await newProject();
      const file = await upload(projectId, `refused with ${status}`);
      await t.testDb.database.db.delete(files).where(eq(files.id, file.id));
      fake.setDefault({ status });
      const lines = await sweepOnce();
      const givenUp = lines.filter((line) => line.msg === 'provider file copy refused for good; no longer tried');
      if (status === 400 || status === 422) {
        expect(await queuedCopies()).toEqual([]);
        expect(givenUp).toEqual([expect.objectContaining({ level: 40, providerFileId: file.providerFileId, status })]);
        expect(JSON.stringify(givenUp)).not.toMatch(/sk-/);
      } else {
        // 401 and 403 are the key's fault, not the copy's: a key put right deletes it, as after a 429 or a 5xx.
        expect(await queuedCopies()).toEqual([{ providerFileId: file.providerFileId, attempts: 1, waitSeconds: expect.closeTo(30, -1) }]);
        expect(givenUp).toEqual([]);
      }
    }
  });

  it('still deletes when the database fails after the rows are gone: the copy stays queued for the sweep', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'queued, never claimed');
    // A claim counts a try; the deletion of the row only makes its copy, queued since it was made, due now.
    await refusingWrites(
      t.testDb.database.db,
      'before update on provider_file_deletions',
      async () => {
        expect((await remove(filesUrl(projectId, `/${file.id}`))).statusCode).toBe(204);
      },
      { when: 'new.attempts > old.attempts', error: "'claims refused'" },
    );
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(await queuedCopies()).toEqual([{ providerFileId: file.providerFileId, attempts: 0, waitSeconds: expect.any(Number) }]);
    await expectSweptAway(file);
  });

  it('leaves the copies queued where OpenAI is configured without its Files API (AI_BASE_URL elsewhere), rather than ask another server', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'an OpenAI copy');
    await t.testDb.database.db.delete(files).where(eq(files.id, file.id));
    const calls = fake.requests.length;
    await sweepOnce({ OPENAI_BASE_URL: '', AI_BASE_URL: fake.url });
    expect(fake.requests).toHaveLength(calls);
    expect(await queuedCopies()).toEqual([{ providerFileId: file.providerFileId, attempts: 0, waitSeconds: expect.any(Number) }]);
  });

  it('lets an instance close at once while its sweep waits on a provider that does not answer', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'held upstream');
    await t.testDb.database.db.delete(files).where(eq(files.id, file.id));
    fake.setDefault({ fault: 'hang' });
    const calls = fake.requests.length;
    const instance = await buildApp(testConfig({ ...appEnv(), AI_TIMEOUT_MS: '60000', DATA_DIR: t.config.DATA_DIR }), { database: t.testDb.database });
    await fake.waitForRequests(calls + 1);
    const started = Date.now();
    await instance.close();
    // Not the minute of the call's own deadline: the close cuts it short.
    expect(Date.now() - started).toBeLessThan(30_000);
    // Tried once; the next try after the call's deadline at least.
    expect(await queuedCopies()).toEqual([{ providerFileId: file.providerFileId, attempts: 1, waitSeconds: expect.closeTo(60, -1) }]);
  });
});

describe('deleting what holds files', () => {
  it('a project deletion removes its files bytes and provider copies, and nobody else\'s', async () => {
    const projectId = await newProject();
    const kept = await newProject();
    const gone = [await upload(projectId, 'first'), await upload(projectId, 'second')];
    const other = await upload(kept, 'stays');

    expect((await remove(`/api/v1/projects/${projectId}`)).statusCode).toBe(204);
    for (const file of gone) expect(existsSync(join(storageRoot, projectId, file.id))).toBe(false);
    expect(existsSync(join(storageRoot, projectId))).toBe(false); // its folder too
    expect(fake.files.has(other.providerFileId!)).toBe(true);
    for (const file of gone) expect(fake.files.has(file.providerFileId!)).toBe(false);
    expect(existsSync(join(storageRoot, kept, other.id))).toBe(true);
    expect(await rowsOf(kept)).toHaveLength(1);
  });

  it('an account deletion removes the files of all its projects', async () => {
    const owner = await registerUser(t.app);
    const projectIds = [await newProject(owner), await newProject(owner)];
    const uploaded: { projectId: string; file: FileDto }[] = [];
    for (const projectId of projectIds) {
      const response = await send(projectId, multipart({ filename: 'a.txt', type: 'text/plain', content: `of ${projectId}` }), owner);
      uploaded.push({ projectId, file: response.json() });
    }
    const deleted = await t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: owner.auth, payload: { password: owner.password } });
    expect(deleted.statusCode).toBe(204);
    for (const { projectId, file } of uploaded) {
      expect(existsSync(join(storageRoot, projectId, file.id))).toBe(false);
      expect(fake.files.has(file.providerFileId!)).toBe(false);
      expect(await rowsOf(projectId)).toHaveLength(0);
    }
  });
});

describe('a token revoked while its upload arrives', () => {
  it('stores nothing of the upload: 401, no row, no bytes, no provider copy', async () => {
    const owner = await registerUser(t.app);
    const projectId = await newProject(owner);
    const copiesBefore = fake.files.size;
    const body = new PassThrough();
    body.write(partHead({ filename: 'stolen.txt', type: 'text/plain' }));
    body.write(Buffer.alloc(1000, 'a'));
    const upload = t.app.inject({
      method: 'POST',
      url: `/api/v1/projects/${projectId}/files`,
      headers: { ...owner.auth, 'content-type': `multipart/form-data; boundary=${BOUNDARY}` },
      payload: body,
    });
    await sleep(200); // its token checked, its body still coming
    await revokeTokens(t.app, owner);
    body.end(Buffer.concat([Buffer.alloc(1000, 'b'), Buffer.from('\r\n'), CLOSING]));
    expectProblem(await upload, 401, 'UNAUTHORIZED');
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(existsSync(join(storageRoot, projectId)) ? readdirSync(join(storageRoot, projectId)) : []).toEqual([]);
    expect(fake.files.size).toBe(copiesBefore);
  });
});

describe.skipIf(!process.env.TEST_DATABASE_URL)('an upload racing the delete of what holds it (PostgreSQL: concurrent connections)', () => {
  // The delete's transaction sleeps after its file rows are gone, for an upload to finish meanwhile.
  beforeAll(async () => {
    await t.testDb.database.db.execute(
      sql.raw(`create function test_pause() returns trigger language plpgsql as $$ begin perform pg_sleep(1); return null; end $$;
        create trigger test_pause after delete on files for each statement execute function test_pause();`),
    );
  });
  afterAll(async () => {
    await t.testDb.database.db.execute(sql.raw('drop trigger test_pause on files; drop function test_pause();'));
  });

  const deletes = {
    project: (owner: RegisteredUser, projectId: string) => remove(`/api/v1/projects/${projectId}`, owner),
    account: (owner: RegisteredUser) =>
      t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: owner.auth, payload: { password: owner.password } }),
  };
  for (const [what, deleteIt] of Object.entries(deletes)) {
    it(`is refused, its bytes and provider copy removed, when the ${what} goes first`, async () => {
      const owner = await registerUser(t.app);
      const projectId = await newProject(owner);
      const deleting = deleteIt(owner, projectId);
      await sleep(300);
      const uploading = await send(projectId, multipart({ filename: 'late.txt', type: 'text/plain', content: 'uploaded during the delete' }), owner);
      expect((await deleting).statusCode).toBe(204);

      expectProblem(uploading, 404, 'NOT_FOUND');
      expect(storedPaths().filter((path) => path.startsWith(projectId))).toEqual([]);
      expect(fake.files.size).toBe(0);
    });
  }
});

describe.skipIf(!process.env.TEST_DATABASE_URL)('an upload whose row was written and its answer lost (PostgreSQL over TCP)', () => {
  it('keeps the bytes and the provider copy the row names: the file can still be downloaded', async () => {
    // Between the app and the database: once armed, the insert's answer (the only one that carries the
    // file's name: the row it returns) is held back, and the connection dropped once the database is
    // ready for the next statement (the insert committed).
    let armed = false;
    let holding = false;
    const readyForQuery = Buffer.from([0x5a, 0, 0, 0, 5]);
    const target = new URL(t.testDb.url!);
    const { port, hostname } = target;
    const proxy = createServer((client) => {
      const server = connect(Number(port), hostname);
      for (const socket of [client, server]) socket.on('error', () => {}).on('close', () => [client, server].forEach((s) => s.destroy()));
      client.pipe(server);
      server.on('data', (chunk: Buffer) => {
        holding ||= armed && chunk.includes('kept.txt');
        if (!holding) client.write(chunk);
        else if (chunk.includes(readyForQuery)) {
          armed = holding = false;
          client.destroy();
        }
      });
    }).listen(0, '127.0.0.1');
    await new Promise((resolve) => proxy.once('listening', resolve));
    target.port = String((proxy.address() as AddressInfo).port);
    const database = openPostgres(target.toString(), { max: 2 });
    const app = await buildApp(t.config, { database });
    try {
      const projectId = await newProject();
      armed = true;
      const { payload, headers } = multipart({ filename: 'kept.txt', type: 'text/plain', content: 'written, unacknowledged' });
      const response = await app.inject({ method: 'POST', url: filesUrl(projectId), headers: { ...user.auth, ...headers }, payload });
      expectProblem(response, 503, 'SERVICE_UNAVAILABLE');

      const [row] = await rowsOf(projectId);
      expect(row).toBeDefined();
      expect((await get(filesUrl(projectId, `/${row!.id}/content`))).body).toBe('written, unacknowledged');
      expect(fake.files.has(row!.providerFileId!)).toBe(true);
    } finally {
      await app.close();
      await database.close();
      proxy.close();
    }
  });
});

describe('a provider that does not answer deletes', () => {
  it('holds up a project deletion AI_TIMEOUT_MS once, not once for every file', async () => {
    const env = { OPENAI_API_KEY: 'sk-test-files', OPENAI_BASE_URL: fake.url, AI_MODEL: 'gpt-4o-mini', AI_MAX_RETRIES: '0' };
    const logs = logCollector();
    const app = await buildApp(testConfig({ ...env, AI_TIMEOUT_MS: '1000', LOG_LEVEL: 'warn', DATA_DIR: t.config.DATA_DIR }), {
      database: t.testDb.database,
      logStream: logs.stream,
    });
    try {
      const projectId = await newProject();
      const uploaded = [await upload(projectId, 'a'), await upload(projectId, 'b'), await upload(projectId, 'c'), await upload(projectId, 'd')];
      fake.setDefault({ fault: 'hang' });

      const started = Date.now();
      expect((await app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}`, headers: user.auth })).statusCode).toBe(204);
      expect(Date.now() - started).toBeLessThan(2_500);
      for (const file of uploaded) expect(existsSync(join(storageRoot, projectId, file.id))).toBe(false);
      // Each copy left upstream is logged by its id.
      const notDeleted = logs.lines.filter((line) => line.msg === 'provider file copy not deleted').map((line) => line.providerFileId);
      expect(notDeleted.sort()).toEqual(uploaded.map((file) => file.providerFileId).sort());
      // And each stays queued, to be tried again.
      expect((await queuedCopies()).map((copy) => copy.providerFileId)).toEqual(notDeleted);
    } finally {
      await app.close();
    }
  });
});

describe('a provider that asks to wait past AI_TIMEOUT_MS', () => {
  // Waited out, its Retry-After would hold the upload or the deletion until AI_TIMEOUT_MS (past this
  // test's own timeout), then fail with ProviderTimeout; given up at once, it fails with the 429's own error.
  it('keeps an upload without a copy, and a deletion\'s copy queued, at once, each asked once', async () => {
    const logs = logCollector();
    const app = await buildApp(testConfig({ ...appEnv(), AI_TIMEOUT_MS: '60000', AI_MAX_RETRIES: '2', LOG_LEVEL: 'warn', DATA_DIR: t.config.DATA_DIR }), {
      database: t.testDb.database,
      logStream: logs.stream,
    });
    try {
      const projectId = await newProject();
      const copied = await upload(projectId, 'copied before the limit');
      fake.setDefault({ status: 429, retryAfter: 3600 });
      const { payload, headers } = multipart({ filename: 'late.txt', type: 'text/plain', content: 'limited' });
      const uploaded = await app.inject({ method: 'POST', url: filesUrl(projectId), headers: { ...user.auth, ...headers }, payload });
      expect(uploaded.statusCode).toBe(201);
      expect(uploaded.json().providerFileId).toBeNull();
      expect((await app.inject({ method: 'DELETE', url: filesUrl(projectId, `/${copied.id}`), headers: user.auth })).statusCode).toBe(204);

      expect(fake.requests.slice(1).map((r) => `${r.method} ${r.path}`)).toEqual(['POST /v1/files', `DELETE /v1/files/${copied.providerFileId}`]);
      const errors = logs.lines.filter((line) => line.level === 40).map((line) => [line.msg, (line.err as { type?: string } | undefined)?.type]);
      expect(errors).toEqual([
        ['provider file upload failed; the file is kept without a provider copy', 'ProviderRateLimited'],
        ['provider file copy not deleted', 'ProviderRateLimited'],
      ]);
      expect((await queuedCopies()).map((copy) => copy.providerFileId)).toEqual([copied.providerFileId]);
    } finally {
      await app.close();
    }
  });

  // One call a copy, each refused at once, would go on asking a provider that said to wait an hour.
  it('stops deleting copies once the provider asks to wait, and keeps the rest queued with their wait, their try not counted', async () => {
    const app = await buildApp(testConfig({ ...appEnv(), AI_TIMEOUT_MS: '60000', AI_MAX_RETRIES: '2', LOG_LEVEL: 'silent', DATA_DIR: t.config.DATA_DIR }), {
      database: t.testDb.database,
    });
    try {
      const projectId = await newProject();
      const uploaded: FileDto[] = [];
      for (let i = 0; i < 12; i++) uploaded.push(await upload(projectId, `file ${i}`));
      fake.setDefault({ status: 429, retryAfter: 3600 });
      const calls = fake.requests.length;
      expect((await app.inject({ method: 'DELETE', url: `/api/v1/projects/${projectId}`, headers: user.auth })).statusCode).toBe(204);

      const asked = fake.requests.slice(calls).filter((r) => r.method === 'DELETE').length;
      expect(asked).toBeGreaterThan(0);
      expect(asked).toBeLessThanOrEqual(8); // the deletions in flight when the first was refused
      const queued = await queuedCopies();
      expect(queued.map((copy) => copy.providerFileId).sort()).toEqual(uploaded.map((file) => file.providerFileId).sort());
      expect(queued.filter((copy) => copy.attempts === 1)).toHaveLength(asked);
      for (const copy of queued) expect(copy.waitSeconds).toBeCloseTo(60, -1);
    } finally {
      await app.close();
    }
  });
});

describe('bytes that cannot be removed', () => {
  /** Puts a folder where a file's bytes are: removing them then fails, as on a volume gone read-only. */
  function jam(projectId: string, file: FileDto): void {
    const path = join(storageRoot, projectId, file.id);
    rmSync(path);
    mkdirSync(join(path, 'stuck'), { recursive: true });
  }

  it('a project deletion still answers 204 and removes every other file\'s bytes and every provider copy', async () => {
    const projectId = await newProject();
    const [first, second] = [await upload(projectId, 'first'), await upload(projectId, 'second')];
    jam(projectId, first!);

    expect((await remove(`/api/v1/projects/${projectId}`)).statusCode).toBe(204);
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(existsSync(join(storageRoot, projectId, second!.id))).toBe(false);
    expect(fake.files.has(first!.providerFileId!)).toBe(false);
    expect(fake.files.has(second!.providerFileId!)).toBe(false);
  });

  it('a file deletion still answers 204 and deletes the provider copy', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'stuck');
    jam(projectId, file);

    expect((await remove(filesUrl(projectId, `/${file.id}`))).statusCode).toBe(204);
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(fake.files.has(file.providerFileId!)).toBe(false);
  });
});

describe('stray bytes', () => {
  it('are removed when the app starts, once a day old and named by no file row of a project the database holds', async () => {
    const projectId = await newProject();
    const folder = join(storageRoot, projectId);
    const kept = await upload(projectId, 'a day old, and its row is there');
    const orphaned = await upload(projectId, 'its row deleted, its bytes left: a removal that failed');
    await t.testDb.database.db.delete(files).where(eq(files.id, orphaned.id));
    const crashed = join(folder, uuidv7()); // named, its row never written: a crash in between
    const young = join(folder, uuidv7()); // an upload whose row may still be coming
    const notOurs = join(folder, 'README'); // no key the files module makes
    for (const path of [crashed, young, notOurs]) writeFileSync(path, 'bytes');
    const emptied = join(storageRoot, uuidv7()); // its last file removed, then a crash before the folder
    mkdirSync(emptied);
    // A project this database does not hold: the folder is another database's too (DATABASE_URL left blank).
    const elsewhere = join(storageRoot, uuidv7());
    mkdirSync(elsewhere);
    const othersUpload = join(elsewhere, uuidv7());
    writeFileSync(othersUpload, 'an upload of another database');
    const dayAgo = (Date.now() - 25 * 60 * 60 * 1000) / 1000;
    for (const path of [join(folder, kept.id), join(folder, orphaned.id), crashed, notOurs, othersUpload]) utimesSync(path, dayAgo, dayAgo);

    // Another start on the same database and folder.
    const logs = logCollector();
    const app = await buildApp(testConfig({ LOG_LEVEL: 'info', DATA_DIR: t.config.DATA_DIR }), { database: t.testDb.database, logStream: logs.stream });
    try {
      await expect.poll(() => logs.lines.find((line) => line.msg === 'removed the file bytes no file row names')).toMatchObject({ removed: 2 });
      expect(readdirSync(folder).sort()).toEqual([kept.id, basename(young), 'README'].sort());
      expect(existsSync(emptied)).toBe(false);
      expect(readFileSync(othersUpload, 'utf8')).toBe('an upload of another database');
      expect((await get(filesUrl(projectId, `/${kept.id}/content`))).body).toBe('a day old, and its row is there');
    } finally {
      await app.close();
    }
  });
});

describe('stray bytes of a deleted project', () => {
  it('are removed when the app starts, once a day old: the delete committed, then a crash before the bytes went', async () => {
    const projectId = await newProject();
    const left = await upload(projectId, 'its project deleted, its bytes left');
    // The project's delete committed (its file rows with it), then the process died before removing the bytes.
    await t.testDb.database.db.delete(projects).where(eq(projects.id, projectId));
    const path = join(storageRoot, projectId, left.id);
    const dayAgo = (Date.now() - 25 * 60 * 60 * 1000) / 1000;
    utimesSync(path, dayAgo, dayAgo);
    // A project deleted long ago, whose bytes any sweep since has seen: no longer remembered afterwards.
    const long = uuidv7();
    await t.testDb.database.db.insert(deletedProjects).values({ id: long, deletedAt: new Date(Date.now() - 3 * 24 * 60 * 60 * 1000) });

    const logs = logCollector();
    const app = await buildApp(testConfig({ LOG_LEVEL: 'info', DATA_DIR: t.config.DATA_DIR }), { database: t.testDb.database, logStream: logs.stream });
    try {
      await expect.poll(() => logs.lines.find((line) => line.msg === 'removed the file bytes no file row names')).toMatchObject({ removed: 1 });
      expect(existsSync(path)).toBe(false);
      const remembered = await t.testDb.database.db.select({ id: deletedProjects.id }).from(deletedProjects).where(inArray(deletedProjects.id, [projectId, long]));
      expect(remembered.map(({ id }) => id)).toEqual([projectId]);
    } finally {
      await app.close();
    }
  });
});

describe('MAX_FILES_PER_PROJECT', () => {
  const MAX = 2;
  const DETAIL = `This project already has the most files it may hold: ${MAX} (MAX_FILES_PER_PROJECT)`;
  let limited: TestApp;
  let limitedUrl: string;
  let limitedRoot: string;
  let owner: RegisteredUser;
  beforeAll(async () => {
    limited = await startTestApp({ ...appEnv(), MAX_FILES_PER_PROJECT: String(MAX) });
    limitedRoot = join(limited.config.DATA_DIR, 'files');
    limitedUrl = await limited.app.listen({ port: 0, host: '127.0.0.1' });
    owner = await registerUser(limited.app);
  });
  afterAll(() => limited.close());

  const post = (projectId: string, content = 'one more', as = owner) => {
    const { payload, headers } = multipart({ filename: 'more.txt', type: 'text/plain', content });
    return limited.app.inject({ method: 'POST', url: filesUrl(projectId), headers: { ...as.auth, ...headers }, payload });
  };
  const stored = async (projectId: string) =>
    (await limited.testDb.database.db.select({ id: files.id }).from(files).where(eq(files.projectId, projectId))).length;
  const holder = (projectId: string): Holder => ({ max: MAX, detail: DETAIL, create: () => post(projectId), stored: () => stored(projectId) });
  const providerUploads = () => fake.requests.filter((request) => request.method === 'POST' && request.path === '/v1/files').length;
  /** A new project of `as` holding `count` files; the fake's record starts after them. */
  async function projectWith(count: number, as = owner) {
    const { id } = await createProject(limited.app, as);
    for (let i = 0; i < count; i++) expect((await post(id, `file ${i}`, as)).statusCode).toBe(201);
    fake.reset();
    return id;
  }
  /** Nothing of a refused upload is left: no bytes but the project's files', none staged, no provider copy no row names. */
  async function onlyStoredFilesKept(projectId: string) {
    const rows = await limited.testDb.database.db.select().from(files).where(eq(files.projectId, projectId));
    const paths = storedPaths(limitedRoot);
    expect(paths.filter((path) => path.startsWith(`${projectId}/`)).sort()).toEqual(rows.map((row) => `${projectId}/${row.id}`).sort());
    expect(paths.filter((path) => path.startsWith('tmp/'))).toEqual([]);
    const named = rows.map((row) => row.providerFileId);
    expect([...fake.files.keys()].filter((id) => !named.includes(id))).toEqual([]);
  }

  it('refuses one file more with 409 CONFLICT naming the limit, before reading it or copying it to the provider', async () => {
    const projectId = await projectWith(MAX);
    await expectFull(holder(projectId));
    expect(providerUploads()).toBe(0);
    await onlyStoredFilesKept(projectId);
  });

  it('refuses an upload that found room but lost it while it arrived, and removes its bytes and provider copy', async () => {
    const projectId = await projectWith(MAX - 1);
    const slow = uploadInTwo(projectId, { filename: 'slow.txt', type: 'text/plain' }, Buffer.from('the first half, '), { server: limitedUrl, owner });
    await waitFor(() => storedPaths(limitedRoot).some((path) => path.startsWith('tmp/')));
    expect((await post(projectId, 'took the last slot')).statusCode).toBe(201);

    const refused = await slow.finish(Buffer.from('then the rest'));
    expect(refused.statusCode).toBe(409);
    expect(JSON.parse(refused.body)).toMatchObject({ code: 'CONFLICT', detail: DETAIL });
    expect(await stored(projectId)).toBe(MAX);
    // Its provider copy was made (the limit is enforced at the insert, after it), then deleted.
    expect(providerUploads()).toBe(2);
    expect(fake.files.size).toBe(1);
    await onlyStoredFilesKept(projectId);
  });

  // A refusal before the body is read closed the connection under a client still sending it: fetch with
  // FormData, what generated clients send, failed with EPIPE, never seeing its 409 or 404. The client is
  // a process of its own: in this one, it has written all it sends before the server reads any of it.
  it('answers a fetch client sending FormData, as generated clients do, with its 409 and its 404, not a broken connection', async () => {
    const large = await startTestApp({ ...appEnv(), FILE_MAX_BYTES: String(8 * 1024 * 1024), MAX_FILES_PER_PROJECT: '1' });
    try {
      const url = await large.app.listen({ port: 0, host: '127.0.0.1' });
      const [holder, stranger] = [await registerUser(large.app), await registerUser(large.app)];
      const { id } = await createProject(large.app, holder);
      const { payload, headers } = multipart({ filename: 'kept.txt', type: 'text/plain', content: 'kept' });
      expect((await large.app.inject({ method: 'POST', url: filesUrl(id), headers: { ...holder.auth, ...headers }, payload })).statusCode).toBe(201);
      const client = `
        const statuses = [];
        for (const [token, size] of ${JSON.stringify([[holder.token, 3], [stranger.token, 3], [holder.token, 4 * 1024 * 1024], [stranger.token, 4 * 1024 * 1024]])}) {
          const form = new FormData();
          form.append('file', new Blob(['x'.repeat(size)], { type: 'text/plain' }), 'more.txt');
          statuses.push(await fetch(${JSON.stringify(url + filesUrl(id))}, { method: 'POST', headers: { authorization: 'Bearer ' + token }, body: form })
            .then((response) => response.status, (error) => String(error.cause?.code ?? error)));
        }
        console.log(JSON.stringify(statuses));`;
      const { stdout } = await execFileAsync(process.execPath, ['--input-type=module', '-e', client]);
      expect(JSON.parse(stdout)).toEqual([409, 404, 409, 404]);
    } finally {
      await large.close();
    }
  });

  // A refusal before the handler (the token) too: Node read such a body to its end, however long. Its
  // rest is read for a while (5 s: a proxy that buffered it sends it whole before reading the answer).
  it('closes the connection a while after refusing an upload whose body is declared longer than an upload may be', async () => {
    const projectId = await projectWith(MAX);
    const { headers } = multipart();
    for (const [authorization, status] of [[owner.auth.authorization, 409], ['Bearer not-a-token', 401]] as const) {
      const request = rawRequest(limitedUrl, 'POST', filesUrl(projectId), { authorization, ...headers, 'content-length': String(LIMIT * 8) });
      request.socket.write(partHead({ filename: 'big.bin' }));
      await request.closed;
      expect(statusLines(request.received())).toEqual([`HTTP/1.1 ${status} `]);
      expect(request.received().toLowerCase()).not.toContain('connection: close');
    }
  });

  // The rest of a refused upload is read while it comes; too slow to come, it was answered a second time
  // on the same connection (408, under a request id of its own), after the 409.
  it('closes the connection of a refused upload whose rest comes too slowly, with no second answer', async () => {
    const slow = await startTestApp({ ...appEnv(), MAX_FILES_PER_PROJECT: '1', REQUEST_TIMEOUT_MS: '1000' });
    let trickle: NodeJS.Timeout | undefined;
    try {
      const url = await slow.app.listen({ port: 0, host: '127.0.0.1' });
      const holder = await registerUser(slow.app);
      const { id } = await createProject(slow.app, holder);
      const kept = multipart({ filename: 'kept.txt', content: 'kept' });
      expect((await slow.app.inject({ method: 'POST', url: filesUrl(id), headers: { ...holder.auth, ...kept.headers }, payload: kept.payload })).statusCode).toBe(201);
      const request = rawRequest(url, 'POST', filesUrl(id), { authorization: holder.auth.authorization, ...kept.headers, 'content-length': '5000' });
      request.socket.write(partHead({ filename: 'more.txt' }));
      await expect.poll(() => request.received().includes('HTTP/1.1 409 '), { timeout: 5_000 }).toBe(true);
      trickle = setInterval(() => request.socket.writable && request.socket.write('x'), 100);
      await request.closed;
      expect(statusLines(request.received())).toEqual(['HTTP/1.1 409 ']);
    } finally {
      clearInterval(trickle);
      await slow.close();
    }
  });

  it('takes a file again once one is deleted', async () => {
    const projectId = await projectWith(MAX);
    const [first] = (await limited.app.inject({ method: 'GET', url: filesUrl(projectId), headers: owner.auth })).json().data;
    await expectDeleteFreesOneSlot(holder(projectId), () =>
      limited.app.inject({ method: 'DELETE', url: filesUrl(projectId, `/${first.id}`), headers: owner.auth }),
    );
    await onlyStoredFilesKept(projectId);
  });

  it('answers another user’s full project with 404, as if it did not exist, and keeps nothing', async () => {
    const projectId = await projectWith(MAX);
    const stranger = await registerUser(limited.app);
    expect(expectProblem(await post(projectId, 'not yours', stranger), 404, 'NOT_FOUND').detail).toBe('Project not found');
    expect(await stored(projectId)).toBe(MAX);
    expect(providerUploads()).toBe(0);
    await onlyStoredFilesKept(projectId);
  });

  it('stores exactly one of many uploads at once into the last slot, and nothing of the others', async () => {
    const projectId = await projectWith(MAX - 1);
    await expectOneOfManyIntoTheLastSlot(holder(projectId));
    await onlyStoredFilesKept(projectId);
  });
});

describe('list', () => {
  it('pages through the files oldest first, and the project counts them', async () => {
    const projectId = await newProject();
    const uploaded = [await upload(projectId, 'a'), await upload(projectId, 'b'), await upload(projectId, 'c')];
    const first = (await get(filesUrl(projectId, '?limit=2'))).json();
    expect(first.data).toEqual(uploaded.slice(0, 2));
    const second = (await get(filesUrl(projectId, `?limit=2&cursor=${first.nextCursor}`))).json();
    expect(second).toEqual({ data: uploaded.slice(2), nextCursor: null });
    expect((await get(`/api/v1/projects/${projectId}`)).json().counts.files).toBe(3);
    expectProblem(await get(filesUrl(projectId, '?limit=0')), 400, 'VALIDATION_ERROR');
    expectProblem(await get(filesUrl(projectId, '?cursor=nope')), 400, 'VALIDATION_ERROR');
  });

  it('lists a slow upload after the files stored while it arrived: a cursor walk already past them finds it', async () => {
    const projectId = await newProject();
    await upload(projectId, 'x', { filename: 'X.txt' });
    const slow = uploadInTwo(projectId, { filename: 'slow.txt', type: 'text/plain' }, Buffer.from('the first half, '));
    await waitFor(() => stagedPaths().length > 0);
    await upload(projectId, 'b', { filename: 'B.txt' });
    await upload(projectId, 'c', { filename: 'C.txt' });

    const seen: string[] = [];
    const walk = async (cursor: string | undefined, more: () => boolean) => {
      do {
        const page = (await get(filesUrl(projectId, `?limit=1${cursor ? `&cursor=${cursor}` : ''}`))).json();
        seen.push(...page.data.map((file: FileDto) => file.filename));
        cursor = page.nextCursor ?? undefined;
      } while (cursor && more());
      return cursor;
    };
    const cursor = await walk(undefined, () => !seen.includes('B.txt'));
    expect((await slow.finish(Buffer.from('then the rest'))).statusCode).toBe(201);
    await walk(cursor, () => true);
    expect(seen).toEqual(['X.txt', 'B.txt', 'C.txt', 'slow.txt']);
  });

  it('lists an upload after the newest file even when the clock is behind it (a clock set back)', async () => {
    const projectId = await newProject();
    const future = new Date(Date.now() + 3_600_000);
    await t.testDb.database.db
      .insert(files)
      .values({ id: uuidv7(), projectId, filename: 'future.txt', mimeType: 'text/plain', size: 1, sha256: 'x', storageUrl: 'x', createdAt: future });
    const uploaded = await upload(projectId, 'now', { filename: 'now.txt', type: 'text/plain' });
    expect(new Date(uploaded.createdAt).getTime()).toBe(future.getTime()); // a microsecond later
    const listed = (await get(filesUrl(projectId))).json().data.map((file: FileDto) => file.filename);
    expect(listed).toEqual(['future.txt', 'now.txt']);
  });

  it('lists an upload after the newest files deleted, to a walk that had reached them, when the clock is behind them', async () => {
    const projectId = await newProject();
    await expectCreateListedAfterDeletedNewest({
      app: t.app,
      headers: user.auth,
      list: filesUrl(projectId),
      insertAhead: async () => {
        const id = uuidv7();
        const createdAt = new Date(Date.now() + 3_600_000);
        await t.testDb.database.db.insert(files).values({ id, projectId, filename: 'ahead.txt', mimeType: 'text/plain', size: 1, sha256: 'x', storageUrl: 'x', createdAt });
        return id;
      },
      create: () => multipart({ filename: 'new.txt', type: 'text/plain', content: 'new' }),
    });
  });

  it.skipIf(!process.env.TEST_DATABASE_URL)('lists an upload that waited for its project after what was stored meanwhile (PostgreSQL: concurrent connections)', async () => {
    const projectId = await newProject();
    await expectWaitingCreateListedLast({
      app: t.app,
      headers: user.auth,
      list: filesUrl(projectId),
      url: t.testDb.url!,
      table: 'files',
      column: 'filename',
      create: (filename) => multipart({ filename, type: 'text/plain', content: 'waited' }),
      parent: { table: 'projects', id: projectId },
      insertRow: `insert into files (id, project_id, filename, mime_type, size, sha256, storage_url, created_at)
        values ($1, $2, 'other.txt', 'text/plain', 1, 'x', 'x', clock_timestamp())`,
    });
  });
});

describe('what an upload must be', () => {
  const refused = async (status: number, code: string, body: { payload: Buffer; headers: Record<string, string> }) => {
    const projectId = await newProject();
    const problem = expectProblem(await send(projectId, body), status, code);
    expect(await rowsOf(projectId)).toHaveLength(0);
    expect(storedPaths().filter((path) => path.startsWith(projectId) || path.startsWith('tmp/'))).toEqual([]);
    expect(fake.requests).toHaveLength(0);
    return problem;
  };

  it('refuses a form without `file` with 400 naming body.file', async () => {
    const problem = await refused(400, 'VALIDATION_ERROR', { payload: CLOSING, headers: multipart().headers });
    expect(problem.errors).toEqual([{ path: 'body.file', message: 'is required' }]);
  });

  it('refuses `file` sent as text, not as a file (curl -F file=a.txt, without its @), saying it must be a file', async () => {
    const problem = await refused(400, 'VALIDATION_ERROR', multipart({ name: 'file', content: 'a.txt' }));
    expect(problem.errors).toEqual([{ path: 'body.file', message: 'must be a file: a part with a filename' }]);
    // After a file, it is a second one.
    const second = await refused(400, 'VALIDATION_ERROR', multipart({ filename: 'a.txt', content: 'a' }, { name: 'file', content: 'b.txt' }));
    expect(second.errors).toEqual([{ path: 'body.file', message: 'must be sent once' }]);
  });

  it.each([
    ['a plain field', [{ name: 'purpose', content: 'assistants' }, { filename: 'a.txt', content: 'a' }], 'body.purpose'],
    ['a field after the file', [{ filename: 'a.txt', content: 'a' }, { name: 'purpose', content: 'assistants' }], 'body.purpose'],
    ['a file under another name', [{ name: 'upload', filename: 'a.txt', content: 'a' }], 'body.upload'],
    ['a second file', [{ filename: 'a.txt', content: 'a' }, { filename: 'b.txt', content: 'b' }], 'body.file'],
  ] as [string, FormPart[], string][])('refuses %s with 400, storing nothing', async (_, parts, path) => {
    const problem = await refused(400, 'VALIDATION_ERROR', multipart(...parts));
    expect((problem.errors as { path: string }[])[0]!.path).toBe(path);
  });

  it.each([
    ['JSON', { payload: Buffer.from('{"file":"x"}'), headers: { 'content-type': 'application/json' } }],
    ['plain text', { payload: Buffer.from('x'), headers: { 'content-type': 'text/plain' } }],
    ['bytes', { payload: Buffer.from('x'), headers: { 'content-type': 'application/octet-stream' } }],
  ])('refuses %s with 415', async (_, body) => {
    await refused(415, 'UNSUPPORTED_MEDIA_TYPE', body);
  });

  it.each([
    ['no boundary', { payload: multipart({ content: 'a', filename: 'a' }).payload, headers: { 'content-type': 'multipart/form-data' } }],
    ['a body cut off in the file', { payload: Buffer.concat([partHead({ filename: 'a.txt' }), Buffer.from('half a file')]), headers: multipart().headers }],
    // The parser's own refusal of it is a 406 Not Acceptable, which is about Accept, not the body.
    ['a field declared JSON that is not', multipart({ name: 'meta', type: 'application/json', content: '{' }, { filename: 'a.txt', content: 'a' })],
  ])('refuses a malformed form (%s) with 400, never 500', async (_, body) => {
    await refused(400, 'VALIDATION_ERROR', body);
  });

  it('answers a refused upload over HTTP at once, and the server goes on serving that client', async () => {
    const projectId = await newProject();
    const tooLarge = multipart({ filename: 'big.bin', content: Buffer.alloc(LIMIT * 4, 1) });
    const twoFiles = multipart({ filename: 'a.txt', content: 'a' }, { filename: 'b.txt', content: Buffer.alloc(LIMIT, 2) });
    // Twice each: a connection left with half a body unread would hang the next request sent on it.
    for (const [body, status] of [[tooLarge, 413], [twoFiles, 400], [tooLarge, 413], [twoFiles, 400]] as const) {
      const response = await fetch(`${baseUrl}${filesUrl(projectId)}`, { method: 'POST', headers: { ...user.auth, ...body.headers }, body: new Uint8Array(body.payload) });
      expect(response.status).toBe(status);
      // A body longer than an upload may be is not read to its end: closed when the refusal came before it
      // had all arrived (how much had is up to timing). One that may be is, the connection kept.
      expect(body === tooLarge ? ['close', 'keep-alive'] : ['keep-alive']).toContain(response.headers.get('connection'));
      await response.body?.cancel();
    }
    const list = await fetch(`${baseUrl}${filesUrl(projectId)}`, { headers: user.auth });
    expect(await list.json()).toEqual({ data: [], nextCursor: null });
  });
});

describe('filenames', () => {
  it.each([
    ['notes.md', 'notes.md'],
    ['../../etc/passwd', 'passwd'],
    ['C:\\Users\\ann\\report.pdf', 'report.pdf'],
    ['a\u0000b\u001fc\u007f.txt', 'abc.txt'],
    ['evil\u202Etxt.exe', 'eviltxt.exe'],
    ['  spaced  ', 'spaced'],
    ['', 'file'],
    [undefined, 'file'],
    ['dir/', 'file'],
    ['résumé 📄.txt', 'résumé 📄.txt'],
    ['\uD800lone.txt', '\uFFFDlone.txt'],
    // Cut to 255 code points, the extension kept, between two characters as a reader sees them.
    [`${'ü'.repeat(300)}.txt`, `${'ü'.repeat(251)}.txt`],
    [`${'あ'.repeat(260)}.pdf`, `${'あ'.repeat(251)}.pdf`],
    [`${'👨‍👩‍👧‍👦'.repeat(40)}.txt`, `${'👨‍👩‍👧‍👦'.repeat(35)}.txt`],
    [`${'x'.repeat(300)}.${'e'.repeat(16)}`, `${'x'.repeat(238)}.${'e'.repeat(16)}`],
    [`${'x'.repeat(300)}.${'e'.repeat(17)}`, 'x'.repeat(255)],
    [`a${'\u0301'.repeat(300)}.txt`, 'file.txt'],
  ])('shows %j as %j', (uploaded, shown) => {
    expect(displayFilename(uploaded)).toBe(shown);
  });

  it('keeps a UTF-8 name as sent, and stores the bytes under the ids alone', async () => {
    const projectId = await newProject();
    const file = await upload(projectId, 'x', { filename: '../résumé 📄.txt' });
    expect(file.filename).toBe('résumé 📄.txt');
    expect(storedPaths().filter((path) => path.startsWith(projectId))).toEqual([`${projectId}/${file.id}`]);
    const download = await get(filesUrl(projectId, `/${file.id}/content`));
    expect(download.headers['content-disposition']).toBe(
      `attachment; filename="r_sum_ __.txt"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%F0%9F%93%84.txt`,
    );
  });

  it('sends a hostile name in Content-Disposition without letting it out of its parameter', async () => {
    const projectId = await newProject();
    // RFC 8187 lets a client send control characters too (the parser drops a part whose name has CR or LF).
    const hostile = `x.txt"; filename*=UTF-8''evil.exe;\tSet-Cookie: a=b\u0001; x='%`;
    const encoded = encodeURIComponent(hostile).replace(/'/g, '%27');
    const file = await upload(projectId, 'x', { filename: undefined, parameters: `filename*=UTF-8''${encoded}` });
    expect(file.filename).toBe(`x.txt"; filename*=UTF-8''evil.exe;Set-Cookie: a=b; x='%`);

    const download = await get(filesUrl(projectId, `/${file.id}/content`));
    expect(download.headers['set-cookie']).toBeUndefined();
    const disposition = String(download.headers['content-disposition']);
    expect(disposition).toBe(attachmentDisposition(file.filename));
    const [, fallback, encodedName] = /^attachment; filename="([\w .()-]*)"; filename\*=UTF-8''([\w%!#$&+.^`|~-]*)$/.exec(disposition)!;
    expect(fallback).toBe('x.txt__ filename__UTF-8__evil.exe_Set-Cookie_ a_b_ x___');
    expect(decodeURIComponent(encodedName!)).toBe(file.filename);
    expect(download.headers['x-content-type-options']).toBe('nosniff');
  });
});

describe('media types', () => {
  const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13]);
  const JPEG = Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0, 16]);
  const ZIP = Buffer.from('PK\x03\x04\x14\x00\x00\x00');
  const stored = (declared: string, ...chunks: (string | Buffer)[]) => {
    const inspector = new ContentInspector();
    for (const chunk of chunks) inspector.inspect(Buffer.from(chunk));
    return inspector.mimeType(declared);
  };

  it.each([
    ['text/plain', ['plain text'], 'text/plain'],
    ['text/csv', ['a,b\n1,2\n'], 'text/csv'],
    ['application/json', ['{"a":1}'], 'application/json'],
    ['text/plain', ['with a NUL\0 in it'], 'application/octet-stream'],
    ['text/plain', [Buffer.from([0xc3, 0x28])], 'application/octet-stream'],
    ['text/plain', [Buffer.from('caf'), Buffer.from([0xc3])], 'application/octet-stream'],
    ['text/plain', [Buffer.from('caf\xc3', 'latin1'), Buffer.from('\xa9', 'latin1')], 'text/plain'],
    ['text/plain', [PNG], 'image/png'],
    ['image/png', [JPEG], 'image/jpeg'],
    ['image/png', ['not a png'], 'application/octet-stream'],
    ['application/pdf', ['not a pdf'], 'application/octet-stream'],
    ['application/octet-stream', ['%PDF-1.7\n'], 'application/pdf'],
    ['application/octet-stream', ['# markdown sent by curl'], 'text/plain'],
    ['application/octet-stream', [Buffer.from([0, 1, 2])], 'application/octet-stream'],
    ['application/vnd.openxmlformats-officedocument.wordprocessingml.document', [ZIP], 'application/vnd.openxmlformats-officedocument.wordprocessingml.document'],
    ['text/plain', [ZIP], 'application/zip'],
    ['audio/mpeg', ['ID3'], 'audio/mpeg'],
  ] as [string, (string | Buffer)[], string][])('stores %s with bytes %j as %s', (declared, chunks, expected) => {
    expect(stored(declared, ...chunks)).toBe(expected);
  });

  it('normalises the declared type and checks it against the bytes on upload', async () => {
    const projectId = await newProject();
    expect((await upload(projectId, 'hello', { type: 'Text/Plain; charset=UTF-8' })).mimeType).toBe('text/plain');
    expect((await upload(projectId, 'hello', { type: 'nonsense' })).mimeType).toBe('text/plain');
    expect((await upload(projectId, PNG, { type: 'text/plain' })).mimeType).toBe('image/png');
    expect((await upload(projectId, PNG, {})).mimeType).toBe('image/png');
    const longest = `application/${'x'.repeat(127)}`;
    expect((await upload(projectId, 'hello', { type: longest })).mimeType).toBe(longest);
    // Longer is not a media type (RFC 6838): it is not stored, listed or sent back as a header.
    const tooLong = await upload(projectId, 'hello', { type: `application/${'x'.repeat(79_000)}` });
    expect(tooLong.mimeType).toBe('text/plain');
    expect((await get(filesUrl(projectId, `/${tooLong.id}/content`))).headers['content-type']).toMatch(/^text\/plain(;|$)/);
  });
});

describe('another user', () => {
  it('gets 404 on every method for a file of a project not theirs, and changes nothing', async () => {
    const other = await registerUser(t.app);
    const projectId = await newProject();
    const file = await upload(projectId, 'private');
    const theirs = await newProject(other);
    const urls = [filesUrl(projectId, `/${file.id}`), filesUrl(projectId, `/${file.id}/content`), filesUrl(theirs, `/${file.id}`), filesUrl(theirs, `/${file.id}/content`)];
    for (const url of urls) {
      expectProblem(await get(url, other), 404, 'NOT_FOUND');
      expect((await t.app.inject({ method: 'HEAD', url, headers: other.auth })).statusCode).toBe(404);
      expectProblem(await remove(url, other), 404, 'NOT_FOUND');
    }
    expectProblem(await get(filesUrl(projectId), other), 404, 'NOT_FOUND');
    expect((await get(filesUrl(theirs), other)).json()).toEqual({ data: [], nextCursor: null });

    fake.reset();
    const before = storedPaths();
    expectProblem(await send(projectId, multipart({ filename: 'planted.txt', content: 'planted' }), other), 404, 'NOT_FOUND');
    expect(storedPaths()).toEqual(before);
    expect(fake.requests).toHaveLength(0);
    expect(await rowsOf(projectId)).toHaveLength(1);
    expect((await get(filesUrl(projectId, `/${file.id}/content`))).body).toBe('private');
  });

  it.each(['not-a-uuid', uuidv7()])('gets 404 for a file id %s that names nothing', async (fileId) => {
    const projectId = await newProject();
    expectProblem(await get(filesUrl(projectId, `/${fileId}`)), 404, 'NOT_FOUND');
    expectProblem(await get(filesUrl(projectId, `/${fileId}/content`)), 404, 'NOT_FOUND');
    expectProblem(await remove(filesUrl(projectId, `/${fileId}`)), 404, 'NOT_FOUND');
  });
});

async function waitFor(condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const giveUpAt = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > giveUpAt) throw new Error('condition not met in time');
    await sleep(10);
  }
}
