import type { Readable } from 'node:stream';
import { and, eq, getTableColumns, inArray, lt, type SQL, sql } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';
import type { FastifyBaseLogger } from 'fastify';
import { uuidv7 } from '../../db/ids.js';
import type { Config } from '../../config.js';
import type { Db } from '../../db/database.js';
import { withFields } from '../../with-fields.js';
import { deletedProjects, files, projects } from '../../db/schema.js';
import { hasCode } from '../../db/error-code.js';
import { ApiError, isDatabaseUnavailable, NotFound, QUERY_CANCELED, ValidationFailed } from '../../http/errors.js';
import { isUuid } from '../../http/ids.js';
import type { Page, PageRequest, TimeSortKey } from '../../http/pagination.js';
import { within } from '../../providers/abort.js';
import type { ProviderRegistry } from '../../providers/registry.js';
import { type ChatMessage, type ProviderAdapter, ProviderNotConfigured } from '../../providers/types.js';
import { CountLimitReached, filesPerProject, type LimitedInsert, limitedInsert, param } from '../projects/count-limit.js';
import { callersProject, inOwnedProject, ownedProject, pageOfProjectRowsByTime, type ProjectRow } from '../projects/service.js';
import { buildFilesSection, EntryCounts, type FilesSection, type FilesSectionOptions } from './chat-section.js';
import { ContentInspector, essence } from './content-type.js';
import { ForgettingDeletedCopies } from './deleted-copies.js';
import { displayFilename } from './filename.js';
import type { FileDto } from './schemas.js';
import type { ProviderCopies } from './provider-copies.js';
import type { ByteRange } from './ranges.js';
import { bytesGone, type FileStorage, type StagedBytes } from './storage.js';
import { isoString } from '../../iso-string.js';

/** One part of a multipart/form-data body, as @fastify/multipart hands it over. */
export type FormPart =
  | { type: 'file'; fieldname: string; filename: string; mimetype: string; file: AsyncIterable<Uint8Array> }
  | { type: 'field'; fieldname: string };

type FileRow = typeof files.$inferSelect;

/** What is left to clean up of a file whose row is gone. */
export type DeletedFile = Pick<FileRow, 'id' | 'projectId' | 'providerFileId'>;

/** Whoever deletes file rows (directly or with their project or account) hands them over to this. */
export interface StoredFileDiscarder {
  discard(rows: DeletedFile[], log: FastifyBaseLogger): Promise<void>;
}

interface ReceivedFile extends StagedBytes {
  filename: string;
  mimeType: string;
}

/** What a chat turn reads of a file row. */
export type ChatFileRow = Pick<FileRow, 'id' | 'projectId' | 'filename' | 'mimeType' | 'size' | 'providerFileId'>;

/**
 * The newest files of the project `projectId` (a column of the caller's statement) as a JSON array
 * of ChatFileRow, for a chat turn to read along with everything else it needs in one round trip.
 */
export function chatFilesOf(projectId: PgColumn): SQL<ChatFileRow[]> {
  return sql<ChatFileRow[]>`(select coalesce(json_agg(json_build_object(
      'id', f.id, 'projectId', f.project_id, 'filename', f.filename, 'mimeType', f.mime_type,
      'size', f.size, 'providerFileId', f.provider_file_id) order by f.created_at desc, f.id desc), '[]')
    from (select * from ${files} where ${files.projectId} = ${projectId}
      order by ${files.createdAt} desc, ${files.id} desc limit ${CHAT_FILES_MAX}) f)`;
}

/** A chat turn considers this many files at most, newest first: far more names than a context holds usefully. */
const CHAT_FILES_MAX = 200;

const HOUR_MS = 60 * 60 * 1000;

class PayloadTooLarge extends ApiError {
  constructor(maxBytes: number) {
    super(413, 'PAYLOAD_TOO_LARGE', `The file is larger than the limit of ${maxBytes} bytes`);
  }
}

function toDto(row: FileRow): FileDto {
  return {
    id: row.id,
    projectId: row.projectId,
    filename: row.filename,
    mimeType: row.mimeType,
    size: row.size,
    sha256: row.sha256,
    providerFileId: row.providerFileId,
    createdAt: isoString(row.createdAt),
  };
}

/** Bytes are stored by ids alone; the uploaded name is only ever displayed. */
const storageKey = (file: { projectId: string; id: string }) => `${file.projectId}/${file.id}`;

/** The file `fileId` of the caller's project `projectId`; a file elsewhere is as missing as no file. */
function ownedFile(userId: string, projectId: string, fileId: string): SQL {
  if (!isUuid(fileId)) throw new NotFound('File');
  return and(eq(files.id, fileId), inOwnedProject(files.projectId, userId, projectId))!;
}

/** A stored file, and a way to its bytes (see `FilesService.content`). */
export interface FileContent {
  file: FileDto;
  open(range?: ByteRange): Promise<Readable>;
}

export class FilesService {
  /** The upload's row, under MAX_FILES_PER_PROJECT (see `upload`). */
  private readonly insert: LimitedInsert<FileRow>;
  /** Chat turns' counts of text files, kept for the turns after (see chat-section.ts). */
  private readonly entryCounts = new EntryCounts();

  constructor(
    private readonly db: Db,
    private readonly storage: FileStorage,
    private readonly providers: ProviderRegistry,
    private readonly providerCopies: ProviderCopies,
    private readonly config: Pick<Config, 'FILE_MAX_BYTES' | 'AI_TIMEOUT_MS' | 'MAX_FILES_PER_PROJECT'>,
  ) {
    this.insert = limitedInsert(db, {
      name: 'create_file',
      limit: filesPerProject(config.MAX_FILES_PER_PROJECT),
      parent: callersProject,
      table: files,
      parentColumn: 'projectId',
      order: { newCreatedAt: 'new_file_created_at', newest: projects.newestFileCreatedAt },
      values: {
        filename: param('filename', 'text'),
        mimeType: param('mimeType', 'text'),
        size: param('size', 'bigint'),
        sha256: param('sha256', 'text'),
        storageUrl: param('storageUrl', 'text'),
        providerFileId: param('providerFileId', 'text'),
      },
    });
  }

  /**
   * Stores the form's one `file`, then copies it to the project's provider when that has a Files API.
   * The bytes are in place before the row that names them is written, and removed again if it is not:
   * a crash in between, or a connection lost before the insert's answer, leaves stray bytes, never a
   * row without them. A failed provider copy only leaves `providerFileId` null. The list orders files by
   * their time, which the insert stamps once it holds the project's lock (see `limitedInsert`): a file
   * whose upload began long ago, or whose insert waited for another's, is listed after every file
   * committed before it, where a client walking the cursors will find it.
   *
   * A project already holding MAX_FILES_PER_PROJECT files is refused before anything is received or
   * copied; the insert enforces the limit again, race-free, against uploads finishing meanwhile, and a
   * refusal there (or a project deleted meanwhile) is cleaned up as any other failure. The caller's
   * token is checked again (`tokenStillCurrent`, which throws if it is not) once the bytes are in place:
   * a body may take minutes to arrive, and a token revoked meanwhile (a password changed, the account
   * deleted) stored its file all the same.
   */
  async upload(
    userId: string,
    projectId: string,
    parts: AsyncIterable<FormPart>,
    log: FastifyBaseLogger,
    tokenStillCurrent: () => Promise<void>,
  ): Promise<FileDto> {
    const project = await this.projectWithRoom(userId, projectId);
    const received = await this.receive(parts);
    let key: string | undefined;
    let providerFileId: string | null = null;
    let inserting = false;
    try {
      providerFileId = await this.copyToProvider(project, received, log);
      if (providerFileId) await this.providerCopies.reserve(providerFileId);
      const id = uuidv7();
      // The project's id as stored, not as the path spelled it (in capitals, perhaps): every later read
      // and delete finds the bytes by the row's.
      key = storageKey({ projectId: project.id, id });
      const storageUrl = await this.storage.keep(received, key);
      await tokenStillCurrent();
      inserting = true;
      const params = {
        userId,
        projectId: project.id,
        id,
        filename: received.filename,
        mimeType: received.mimeType,
        size: received.size,
        sha256: received.sha256,
        storageUrl,
        providerFileId,
      };
      return toDto(await this.insert.run(params, () => new NotFound('Project')));
    } catch (error) {
      // But an insert that PostgreSQL cancelled (past DATABASE_QUERY_TIMEOUT_MS: waiting out a backup's
      // hold on the files) was rolled back, its one statement's transaction with it: nothing names them.
      if (inserting && isDatabaseUnavailable(error) && !hasCode(error, QUERY_CANCELED)) {
        // The connection was lost with the insert sent, perhaps after its commit: a row may name these
        // bytes and this provider copy. They are left; bytes no row names go with the sweep at a start,
        // a copy no row names with the queue a day later (`reserve`).
        log.warn({ err: error, key, providerFileId }, 'file row not confirmed by the database; its bytes are left in place');
        throw error;
      }
      // Wherever the bytes got to: still staged, or already under the key. A cleanup that fails leaves
      // stray bytes, and must neither hide the error nor stop the rest of the cleanup.
      await Promise.allSettled([this.storage.drop(received), key && this.storage.remove(key)]);
      if (providerFileId) await this.providerCopies.discardUnnamed(providerFileId, log);
      throw error;
    }
  }

  /** Oldest first, as every list of the API. */
  async list(userId: string, projectId: string, page: PageRequest<TimeSortKey>): Promise<Page<FileDto>> {
    const { data, nextCursor } = await pageOfProjectRowsByTime(this.db, files, userId, projectId, page);
    return { data: data.map(toDto), nextCursor };
  }

  async get(userId: string, projectId: string, fileId: string): Promise<FileDto> {
    return toDto(await this.ownedRow(userId, projectId, fileId));
  }

  /**
   * The file, and a way to its bytes (or `range` of them) that opens them before anything is sent:
   * missing bytes fail the request, not the stream.
   */
  async content(userId: string, projectId: string, fileId: string): Promise<FileContent> {
    const row = await this.ownedRow(userId, projectId, fileId);
    const open = async (range?: ByteRange) => {
      try {
        return await this.openBytes(row, range);
      } catch (error) {
        if (bytesGone(error)) throw new NotFound('File');
        throw error;
      }
    };
    return { file: toDto(row), open };
  }

  /** The row goes first (owner-checked, one statement), then the bytes, then the provider copy. */
  async delete(userId: string, projectId: string, fileId: string, log: FastifyBaseLogger): Promise<void> {
    const [row] = await this.db.delete(files).where(ownedFile(userId, projectId, fileId)).returning();
    if (!row) throw new NotFound('File');
    await this.discard([row], log);
  }

  /**
   * Removes the bytes and provider copies of file rows already deleted (a file, a project, an account).
   * The delete has committed: bytes that cannot be removed (a volume gone read-only) are logged and
   * left, like a provider copy, and the rest is still done; they are stray bytes no row names.
   */
  async discard(rows: DeletedFile[], log: FastifyBaseLogger): Promise<void> {
    for (const row of rows) {
      const key = storageKey(row);
      try {
        await this.storage.remove(key);
      } catch (error) {
        log.warn({ err: error, key }, 'file bytes not removed');
      }
    }
    // Queued with their rows' deletion (see ProviderCopies): what is not deleted now is tried again later.
    await this.providerCopies.deleteNow(rows.flatMap((row) => (row.providerFileId ? [row.providerFileId] : [])), log);
  }

  /**
   * Removes, of the bytes under `keys`, those that no file row names under a project this database
   * holds or deleted lately (`deleted_projects`): left by a crash between an upload's bytes being named
   * and its row being written, by a crash between a delete's commit and the bytes' removal, or by a
   * removal that failed once its row was gone. Never those of a project it knows nothing of: the folder
   * may be another database's (`DATABASE_URL` left blank starts on the embedded one; a URL naming
   * another database), whose uploads would all look stray, and were all removed. The keys must be of
   * bytes written more than `olderThanMs` ago, too old to be an upload whose row is still to come. Goes
   * on while `stop` says no; resolves with how many it removed. Once through, it prunes the deleted
   * projects no byte can still be waiting for: any of theirs is older than `olderThanMs` by now, so this
   * sweep has seen it.
   */
  async removeStrayBytes(keys: AsyncIterable<string[]>, olderThanMs: number, stop: () => boolean): Promise<number> {
    const started = Date.now();
    let removed = 0;
    for await (const batch of keys) {
      if (stop()) break;
      // Only keys of the files module's own making (`project/file`, ids as stored: in lower case):
      // nothing else under the folder is its to remove.
      const ours = batch.flatMap((key) => {
        const ids = key.split('/');
        return key === key.toLowerCase() && ids.length === 2 && ids.every(isUuid) ? [{ key, projectId: ids[0]!, fileId: ids[1]! }] : [];
      });
      if (!ours.length) continue;
      const [rows, known] = await Promise.all([
        this.db
          .select({ id: files.id, projectId: files.projectId })
          .from(files)
          .where(inArray(files.id, ours.map(({ fileId }) => fileId))),
        this.projectsKnown([...new Set(ours.map(({ projectId }) => projectId))]),
      ]);
      const named = new Set(rows.map(storageKey));
      for (const { key, projectId } of ours) {
        if (named.has(key) || !known.has(projectId)) continue;
        await this.storage.remove(key);
        removed++;
      }
    }
    // Deleted before the sweep began by more than `olderThanMs`, and an hour more for the service's clock
    // (the bytes' times) and the database's to differ by.
    const age = olderThanMs + (Date.now() - started) + HOUR_MS;
    if (!stop()) await this.db.delete(deletedProjects).where(lt(deletedProjects.deletedAt, sql`now() - ${age} * interval '1 millisecond'`));
    return removed;
  }

  /** Of `ids`, the projects this database holds or deleted lately: one statement. */
  private async projectsKnown(ids: string[]): Promise<Set<string>> {
    const known = await this.db
      .select({ id: projects.id })
      .from(projects)
      .where(inArray(projects.id, ids))
      .unionAll(this.db.select({ id: deletedProjects.id }).from(deletedProjects).where(inArray(deletedProjects.id, ids)));
    return new Set(known.map(({ id }) => id));
  }

  /**
   * The files section of a chat turn's context (see chat-section.ts), from the rows `chatFilesOf`
   * read. The caller has checked that the project is the user's.
   */
  chatSection(rows: ChatFileRow[], { encoding, ...options }: Omit<FilesSectionOptions, 'counted'> & { encoding: string }): Promise<FilesSection | undefined> {
    return buildFilesSection(
      rows.map((row) => withFields(row, { readText: () => this.readText(row) })),
      withFields(options, { counted: { encoding, counts: this.entryCounts } }),
    );
  }

  /**
   * The adapter for a turn of the project `projectId` whose new message is `question`: one that makes
   * a call refused for files deleted meanwhile again without them (see ForgettingDeletedCopies), when
   * the message names any.
   */
  turnAdapter(projectId: string, adapter: ProviderAdapter, question: ChatMessage): ProviderAdapter {
    if (!question.fileIds?.length) return adapter;
    return new ForgettingDeletedCopies(adapter, async (providerFileIds) => {
      const rows = await this.db
        .select({ providerFileId: files.providerFileId })
        .from(files)
        .where(and(eq(files.projectId, projectId), inArray(files.providerFileId, providerFileIds)));
      return rows.map((row) => row.providerFileId!);
    });
  }

  /** The caller's project, checked to have room for one more file: 404 when it is not theirs, else 409 when full. */
  private async projectWithRoom(userId: string, projectId: string): Promise<ProjectRow> {
    const [row] = await this.db
      .select({ ...getTableColumns(projects), fileCount: this.db.$count(files, eq(files.projectId, projects.id)) })
      .from(projects)
      .where(ownedProject(userId, projectId));
    if (!row) throw new NotFound('Project');
    const { fileCount, ...project } = row;
    if (fileCount >= this.insert.limit.max) throw new CountLimitReached(this.insert.limit);
    return project;
  }

  private async ownedRow(userId: string, projectId: string, fileId: string): Promise<FileRow> {
    const [row] = await this.db.select().from(files).where(ownedFile(userId, projectId, fileId));
    if (!row) throw new NotFound('File');
    return row;
  }

  /**
   * Streams the one `file` part to storage, hashing, counting and inspecting it on the way. Anything
   * else in the form is refused, as unknown JSON properties are; on any failure nothing stays stored.
   */
  private async receive(parts: AsyncIterable<FormPart>): Promise<ReceivedFile> {
    let received: ReceivedFile | undefined;
    try {
      for await (const part of parts) {
        if (part.fieldname === 'file' && received) throw new ValidationFailed('One file per upload', [{ path: 'body.file', message: 'must be sent once' }]);
        // `file` sent as text (`curl -F file=notes.txt`, without its `@`; a form's file with no filename)
        // is told so: "send only `file`" told it to send what it had sent.
        if (part.type !== 'file' && part.fieldname === 'file') {
          throw new ValidationFailed('The upload has no file', [{ path: 'body.file', message: 'must be a file: a part with a filename' }]);
        }
        if (part.type !== 'file' || part.fieldname !== 'file') {
          throw new ValidationFailed('Unexpected form field', [{ path: `body.${part.fieldname}`, message: 'is not a field of an upload; send only `file`' }]);
        }
        const inspector = new ContentInspector();
        const staged = await this.storage.stage(this.inspected(part.file, inspector));
        received = { ...staged, filename: displayFilename(part.filename), mimeType: inspector.mimeType(essence(part.mimetype)) };
      }
    } catch (error) {
      if (received) await this.storage.drop(received);
      throw error;
    }
    if (!received) throw new ValidationFailed('The upload has no file', [{ path: 'body.file', message: 'is required' }]);
    return received;
  }

  /** The bytes as they arrive, stopped one byte past FILE_MAX_BYTES (the parser lets exactly that one through). */
  private async *inspected(source: AsyncIterable<Uint8Array>, inspector: ContentInspector): AsyncGenerator<Uint8Array> {
    let size = 0;
    for await (const chunk of source) {
      size += chunk.byteLength;
      if (size > this.config.FILE_MAX_BYTES) throw new PayloadTooLarge(this.config.FILE_MAX_BYTES);
      inspector.inspect(chunk);
      yield chunk;
    }
  }

  /** The provider's file id, or null when the project's provider has no Files API or the upload failed. */
  private async copyToProvider(project: ProjectRow, file: ReceivedFile, log: FastifyBaseLogger): Promise<string | null> {
    const adapter = this.filesAdapter(project);
    if (!adapter?.uploadFile) return null;
    try {
      const upload = { filename: file.filename, mimeType: file.mimeType, path: file.path };
      const { providerFileId } = await adapter.uploadFile(upload, { ...within(this.config.AI_TIMEOUT_MS), log });
      return providerFileId;
    } catch (error) {
      // The platform's copy is the file; the provider's only lets chat refer to it.
      log.warn({ err: error, provider: adapter.name }, 'provider file upload failed; the file is kept without a provider copy');
      return null;
    }
  }

  private filesAdapter(project: ProjectRow): ProviderAdapter | undefined {
    try {
      const { adapter } = this.providers.resolve(project.provider, project.model);
      return adapter.supportsFiles ? adapter : undefined;
    } catch (error) {
      if (error instanceof ProviderNotConfigured) return undefined;
      throw error;
    }
  }

  private async readText(file: ChatFileRow): Promise<string> {
    const bytes = await (await this.openBytes(file)).toArray();
    return new TextDecoder().decode(Buffer.concat(bytes));
  }

  /**
   * The bytes of `file`, or `range` of them. Bytes not there are those of a file deleted since its row
   * was read (a delete commits the row's removal first), and reject as `bytesGone`; while the row is still
   * there, they are lost to this instance, and reject as BytesMissing.
   */
  private async openBytes(file: Pick<FileRow, 'id' | 'projectId'>, range?: ByteRange): Promise<Readable> {
    try {
      return await this.storage.open(storageKey(file), range);
    } catch (error) {
      if (!bytesGone(error)) throw error;
      const [recorded] = await this.db.select({ id: files.id }).from(files).where(eq(files.id, file.id));
      throw recorded ? new BytesMissing(file.id, error) : error;
    }
  }
}

/**
 * A file whose row is there and whose bytes are not: most often an instance that does not share
 * `DATA_DIR` with the one that took the upload, or a data directory restored without its files. An error
 * of the deployment, not a file deleted: the request that meets it fails (500) and the log says which
 * file and where its bytes were looked for (the cause's path), so that nobody takes the file for gone.
 */
class BytesMissing extends Error {
  constructor(fileId: string, cause: unknown) {
    super(`file ${fileId} is recorded but its bytes are missing from this instance's DATA_DIR (is DATA_DIR one volume shared by every instance?)`, { cause });
    this.name = 'BytesMissing';
  }
}
