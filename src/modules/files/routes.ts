import type { IncomingHttpHeaders } from 'node:http';
import multipart, { type Multipart } from '@fastify/multipart';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { ApiError, ValidationFailed } from '../../http/errors.js';
import { sendContinue } from '../../http/hardening.js';
import { noContent } from '../../http/openapi.js';
import { projectParams } from '../projects/schemas.js';
import { isTextType } from './content-type.js';
import { attachmentDisposition } from './filename.js';
import { clientHas, entityTag, matchesIfMatch, requestedRange } from './ranges.js';
import { file, fileListQuery, filePage, fileParams } from './schemas.js';
import type { FileContent, FilesService, FormPart } from './service.js';

/** Mounted under /api/v1/projects/:projectId/files. */
export const fileRoutes: FastifyPluginAsyncZod<{ files: FilesService; maxBytes: number }> = async (app, { files, maxBytes }) => {
  // Registered here, not globally: everywhere else a multipart body stays a 415.
  await app.register(multipart);
  const parsing = {
    // One byte past the limit gets through, so that the service sees the file is too large (413)
    // rather than a silently truncated one.
    limits: { fileSize: maxBytes + 1, fieldSize: 1024 },
    // Browsers and fetch send UTF-8 filenames as they are; busboy would read them as Latin-1.
    defParamCharset: 'utf8',
  };

  app.post(
    '/',
    {
      schema: {
        tags: ['files'],
        operationId: 'uploadFile',
        description:
          'multipart/form-data with one part, `file`. Streamed to storage; over FILE_MAX_BYTES is 413 and nothing is kept. A project already holding MAX_FILES_PER_PROJECT files is 409.',
        consumes: ['multipart/form-data'],
        documentedBody: z.strictObject({ file: z.string().meta({ format: 'binary', description: 'The file’s bytes, its name and media type' }) }),
        params: projectParams,
        response: { 201: file },
        problems: ['CONFLICT'],
      },
    },
    async (request, reply) => {
      // The body is asked for when the service first reads it, once the project and its room are checked.
      const parts = formParts(request.parts(parsing), () => sendContinue(request, reply));
      const created = await files.upload(request.user.id, request.params.projectId, parts, request.log, () => request.assertTokenStillCurrent());
      return reply.code(201).header('location', `/api/v1/projects/${created.projectId}/files/${created.id}`).send(created);
    },
  );

  app.get(
    '/',
    { schema: { tags: ['files'], operationId: 'listFiles', params: projectParams, querystring: fileListQuery, response: { 200: filePage } } },
    async (request) => files.list(request.user.id, request.params.projectId, request.query),
  );

  app.get(
    '/:fileId',
    { schema: { tags: ['files'], operationId: 'getFile', params: fileParams, response: { 200: file } } },
    async (request) => files.get(request.user.id, request.params.projectId, request.params.fileId),
  );

  const downloadSchema = {
    tags: ['files'],
    operationId: 'downloadFile',
    description:
      'The bytes as uploaded, as an attachment. Its ETag (the SHA-256, quoted) answers If-None-Match with 304, and an ' +
      'If-Match that names other bytes with 412; a Range of one span of bytes (`bytes=first-last`, `bytes=first-`, ' +
      '`bytes=-suffix`) is answered with 206, honouring If-Range.',
    params: fileParams,
    headers: downloadHeaders,
    // Documentation only: a stream is sent as it is, never serialized.
    response: {
      200: { description: 'The bytes, with the stored media type', content: { '*/*': { schema: binary } } },
      206: { description: 'The range asked for, named by Content-Range', content: { '*/*': { schema: binary } } },
      304: noContent.describe('Not Modified: the bytes If-None-Match names'),
    },
    problems: ['PRECONDITION_FAILED', 'RANGE_NOT_SATISFIABLE'] as const,
    responseHeaders: { 200: bytesHeaders, 206: { ...bytesHeaders, 'Content-Range': contentRange }, 304: validator, 416: { 'Content-Range': contentRange } },
  };
  // HEAD has a route of its own: Fastify's runs the GET and reads the whole file to discard it. Neither
  // is compressed: the bytes go as uploaded, with their length, which a HEAD can then tell as the GET does.
  const download = async (request: FastifyRequest<{ Params: z.infer<typeof fileParams> }>, reply: FastifyReply) => {
    const { user, params, headers, method } = request;
    return answerDownload(reply, await files.content(user.id, params.projectId, params.fileId), headers, method === 'GET');
  };
  app.get('/:fileId/content', { schema: downloadSchema, exposeHeadRoute: false, compress: false }, download);
  // A HEAD takes no Range (RFC 9110 §14.2: only a GET does): its answer is the whole file's headers.
  const { 206: _range, ...headResponses } = downloadSchema.response;
  const { 206: _rangeHeaders, 416: _unsatisfiable, ...headHeaders } = downloadSchema.responseHeaders;
  const headSchema = {
    ...downloadSchema,
    headers: downloadHeaders.omit({ range: true, 'if-range': true }),
    description: 'The headers of the bytes’ GET without a Range, no bytes: its ETag answers If-None-Match with 304, and an If-Match that names other bytes with 412.',
    response: headResponses,
    problems: ['PRECONDITION_FAILED'] as const,
    responseHeaders: headHeaders,
  };
  app.head('/:fileId/content', { schema: headSchema, compress: false }, download);

  app.delete('/:fileId', { schema: { tags: ['files'], operationId: 'deleteFile', params: fileParams, response: { 204: noContent } } }, async (request, reply) => {
    await files.delete(request.user.id, request.params.projectId, request.params.fileId, request.log);
    return reply.code(204).send();
  });
};

const binary = z.any().meta({ type: 'string', format: 'binary' });

/** What a download reads of its request's headers, as the document shows it (a generated client's types had none). */
const downloadHeaders = z.object({
  range: z.string().optional().meta({ description: 'One span of bytes: `bytes=first-last`, `bytes=first-` or `bytes=-suffix`; answered with 206' }),
  'if-range': z.string().optional().meta({ description: 'The ETag the Range is for: other bytes are sent whole (200)' }),
  'if-none-match': z.string().optional().meta({ description: 'ETags the client has: 304 when the bytes are among them' }),
  'if-match': z.string().optional().meta({ description: 'ETags the request is for: 412 when the bytes are other' }),
});

/** What a download's answers say of the bytes (see `answerDownload`), as the document shows it. */
const validator = {
  ETag: { type: 'string', description: 'The SHA-256 of the bytes, quoted' },
  'Cache-Control': { type: 'string', description: '`private, no-cache`: a client may keep the bytes, and checks them by their ETag before each use' },
} as const;
const bytesHeaders = {
  ...validator,
  'Content-Disposition': { type: 'string', description: '`attachment`, with the filename as uploaded (`filename*`, UTF-8, and an ASCII `filename`)' },
  'Content-Length': { type: 'integer', description: 'The bytes sent' },
  'X-Content-Type-Options': { type: 'string', description: '`nosniff`' },
  'Accept-Ranges': { type: 'string', description: '`bytes`' },
} as const;
const contentRange = { type: 'string', description: 'The span sent, `bytes first-last/size`; on 416, `bytes */size`' } as const;

/**
 * A download, or with `isGet` false a HEAD's headers of it, from bytes opened (so known to be there)
 * and never read: a HEAD tells what the whole GET would, as ranges are for GET alone (RFC 9110 §14.2).
 */
async function answerDownload(reply: FastifyReply, { file: stored, open }: FileContent, headers: IncomingHttpHeaders, isGet: boolean) {
  const tag = entityTag(stored.sha256);
  // In RFC 9110's order (§13.2.2): If-Match, If-None-Match, then Range with If-Range.
  if (!matchesIfMatch(headers, tag)) throw new ApiError(412, 'PRECONDITION_FAILED', 'If-Match names none of these bytes');
  // Kept by the client's own cache (never a shared one) and checked again by its ETag before each use:
  // a 304 says what its 200 would (RFC 9110 §15.4.5).
  reply.header('cache-control', 'private, no-cache');
  // The client has these bytes already, and they never change.
  if (clientHas(headers, tag)) return reply.code(304).header('etag', tag).send();
  const range = isGet ? requestedRange(headers, tag, stored.size) : undefined;
  if (range === 'unsatisfiable') {
    // With the file's size in Content-Range (RFC 9110 §15.5.17).
    const detail = `The range asked for is not within the file's ${stored.size} bytes`;
    throw new ApiError(416, 'RANGE_NOT_SATISFIABLE', detail, {}, { 'content-range': `bytes */${stored.size}` });
  }
  // Read to the file's known end, not to the end a read finds: the stream ends with its last bytes,
  // and the answer with them. A client that hangs up the moment it has them all (curl does) otherwise
  // closed its connection while the stream still read on to the end of the file, and the answer it
  // had was counted and logged as one it left before (499), about one time in ten.
  const bytes = await open(range ?? (stored.size > 0 ? { start: 0, end: stored.size - 1 } : undefined));
  reply
    // Text types were checked to be UTF-8 when uploaded.
    .type(isTextType(stored.mimeType) ? `${stored.mimeType}; charset=utf-8` : stored.mimeType)
    .header('content-length', range ? range.end - range.start + 1 : stored.size)
    .header('content-disposition', attachmentDisposition(stored.filename))
    .header('x-content-type-options', 'nosniff')
    .header('etag', tag)
    .header('accept-ranges', 'bytes');
  if (range) reply.code(206).header('content-range', `bytes ${range.start}-${range.end}/${stored.size}`);
  if (isGet) return reply.send(bytes);
  bytes.destroy();
  return reply.send();
}

/**
 * The form's parts, `onFirstRead` called when the first is asked for. A body that the parser cannot read (no boundary, cut off, malformed) fails with a
 * plain error, which is the client's mistake (400), not the server's; the plugin's own errors carry
 * their status (413, 415…) and pass as they are.
 */
async function* formParts(parts: AsyncIterable<Multipart>, onFirstRead: () => void): AsyncGenerator<FormPart> {
  onFirstRead();
  try {
    for await (const part of parts) {
      yield part.type === 'file' ? { ...part, file: clientBytes(part.file) } : part;
    }
  } catch (error) {
    throw asClientError(error);
  }
}

async function* clientBytes(stream: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  try {
    yield* stream;
  } catch (error) {
    throw asClientError(error);
  }
}

function asClientError(error: unknown): unknown {
  const status = (error as { statusCode?: unknown }).statusCode;
  return typeof status === 'number' ? error : new ValidationFailed('The multipart/form-data body is malformed or incomplete');
}
