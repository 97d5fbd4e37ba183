import multipart, { type Multipart } from '@fastify/multipart';
import type { FastifyReply } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { ValidationFailed } from '../../http/errors.js';
import { noContent } from '../../http/openapi.js';
import { projectParams } from '../projects/schemas.js';
import { isTextType } from './content-type.js';
import { attachmentDisposition } from './filename.js';
import { file, type FileDto, fileListQuery, filePage, fileParams } from './schemas.js';
import type { FilesService, FormPart } from './service.js';

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
      try {
        const parts = formParts(request.parts(parsing));
        const created = await files.upload(request.user.id, request.params.projectId, parts, request.log);
        return reply.code(201).header('location', `/api/v1/projects/${created.projectId}/files/${created.id}`).send(created);
      } catch (error) {
        // A refusal can come before the body's end (a file too large, a field too many); the rest is
        // not worth reading, and the parser no longer does. Closing after the answer frees the connection.
        if (!request.raw.complete) reply.header('connection', 'close');
        throw error;
      }
    },
  );

  app.get(
    '/',
    { schema: { tags: ['files'], params: projectParams, querystring: fileListQuery, response: { 200: filePage } } },
    async (request) => files.list(request.user.id, request.params.projectId, request.query),
  );

  app.get(
    '/:fileId',
    { schema: { tags: ['files'], params: fileParams, response: { 200: file } } },
    async (request) => files.get(request.user.id, request.params.projectId, request.params.fileId),
  );

  const downloadSchema = {
    tags: ['files'],
    description: 'The bytes as uploaded, as an attachment.',
    params: fileParams,
    // Documentation only: a stream is sent as it is, never serialized.
    response: {
      200: { description: 'The bytes, with the stored media type', content: { '*/*': { schema: z.any().meta({ type: 'string', format: 'binary' }) } } },
    },
  };
  // HEAD has a handler of its own: Fastify's runs the GET and reads the whole file to discard it. Neither
  // is compressed: the bytes go as uploaded, with their length, which a HEAD can then tell as the GET does.
  app.get('/:fileId/content', { schema: downloadSchema, exposeHeadRoute: false, compress: false }, async (request, reply) => {
    const { file: stored, bytes } = await files.content(request.user.id, request.params.projectId, request.params.fileId);
    return downloadHeaders(reply, stored).send(bytes);
  });
  // Undocumented, as every HEAD: the GET's headers, from bytes known to be there (opened), never read.
  app.head('/:fileId/content', { schema: { ...downloadSchema, hide: true }, compress: false }, async (request, reply) => {
    const { file: stored, bytes } = await files.content(request.user.id, request.params.projectId, request.params.fileId);
    bytes.destroy();
    return downloadHeaders(reply, stored).send();
  });

  app.delete('/:fileId', { schema: { tags: ['files'], params: fileParams, response: { 204: noContent } } }, async (request, reply) => {
    await files.delete(request.user.id, request.params.projectId, request.params.fileId, request.log);
    return reply.code(204).send();
  });
};

function downloadHeaders(reply: FastifyReply, stored: FileDto): FastifyReply {
  return (
    reply
      // Text types were checked to be UTF-8 when uploaded.
      .type(isTextType(stored.mimeType) ? `${stored.mimeType}; charset=utf-8` : stored.mimeType)
      .header('content-length', stored.size)
      .header('content-disposition', attachmentDisposition(stored.filename))
      .header('x-content-type-options', 'nosniff')
  );
}

/**
 * The form's parts. A body that the parser cannot read (no boundary, cut off, malformed) fails with a
 * plain error, which is the client's mistake (400), not the server's; the plugin's own errors carry
 * their status (413, 415…) and pass as they are.
 */
async function* formParts(parts: AsyncIterable<Multipart>): AsyncGenerator<FormPart> {
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
