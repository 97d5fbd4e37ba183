import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { BODY_LIMIT_BYTES } from '../../http/body-limits.js';
import { noContent } from '../../http/openapi.js';
import { projectParams } from '../projects/schemas.js';
import { createPromptBody, prompt, promptListQuery, promptPage, promptParams, updatePromptBody } from './schemas.js';
import type { PromptsService } from './service.js';

/** Mounted under /api/v1/projects/:projectId/prompts. */
export const promptRoutes: FastifyPluginAsyncZod<{ prompts: PromptsService }> = async (app, { prompts }) => {
  app.post(
    '/',
    { bodyLimit: BODY_LIMIT_BYTES, schema: { tags: ['prompts'], operationId: 'createPrompt', params: projectParams, body: createPromptBody, response: { 201: prompt }, problems: ['CONFLICT'] } },
    async (request, reply) => {
      const created = await prompts.create(request.user.id, request.params.projectId, request.body);
      return reply.code(201).header('location', `/api/v1/projects/${created.projectId}/prompts/${created.id}`).send(created);
    },
  );

  app.get(
    '/',
    { schema: { tags: ['prompts'], operationId: 'listPrompts', params: projectParams, querystring: promptListQuery, response: { 200: promptPage } } },
    async (request) => prompts.list(request.user.id, request.params.projectId, request.query),
  );

  app.get(
    '/:promptId',
    { schema: { tags: ['prompts'], operationId: 'getPrompt', params: promptParams, response: { 200: prompt } } },
    async (request) => prompts.get(request.user.id, request.params.projectId, request.params.promptId),
  );

  app.patch(
    '/:promptId',
    { bodyLimit: BODY_LIMIT_BYTES, schema: { tags: ['prompts'], operationId: 'updatePrompt', params: promptParams, body: updatePromptBody, response: { 200: prompt } } },
    async (request) =>
      prompts.update(request.user.id, request.params.projectId, request.params.promptId, request.body),
  );

  app.delete('/:promptId', { schema: { tags: ['prompts'], operationId: 'deletePrompt', params: promptParams, response: { 204: noContent } } }, async (request, reply) => {
    await prompts.delete(request.user.id, request.params.projectId, request.params.promptId);
    return reply.code(204).send();
  });
};
