import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { noContent } from '../../http/openapi.js';
import { projectParams } from '../projects/schemas.js';
import { messageListQuery, messagePage } from './schemas.js';
import type { MessagesService } from './service.js';

/** Mounted under /api/v1/projects/:projectId/messages; new messages come from chat. */
export const messageRoutes: FastifyPluginAsyncZod<{ messages: MessagesService }> = async (app, { messages }) => {
  app.get(
    '/',
    { schema: { tags: ['messages'], operationId: 'listMessages', params: projectParams, querystring: messageListQuery, response: { 200: messagePage } } },
    async (request) => messages.list(request.user.id, request.params.projectId, request.query),
  );

  app.delete('/', { schema: { tags: ['messages'], operationId: 'clearMessages', params: projectParams, response: { 204: noContent } } }, async (request, reply) => {
    await messages.clear(request.user.id, request.params.projectId);
    return reply.code(204).send();
  });
};
