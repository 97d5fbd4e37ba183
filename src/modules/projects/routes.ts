import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { noContent } from '../../http/openapi.js';
import {
  createProjectBody,
  project,
  projectListQuery,
  projectPage,
  projectParams,
  updateProjectBody,
} from './schemas.js';
import type { ProjectsService } from './service.js';

export const projectRoutes: FastifyPluginAsyncZod<{ projects: ProjectsService }> = async (app, { projects }) => {
  app.post(
    '/',
    { schema: { tags: ['projects'], operationId: 'createProject', body: createProjectBody, response: { 201: project }, problems: ['CONFLICT'] } },
    async (request, reply) => {
      const created = await projects.create(request.user.id, request.body);
      return reply.code(201).header('location', `/api/v1/projects/${created.id}`).send(created);
    },
  );

  app.get(
    '/',
    { schema: { tags: ['projects'], operationId: 'listProjects', querystring: projectListQuery, response: { 200: projectPage } } },
    async (request) => projects.list(request.user.id, request.query),
  );

  app.get(
    '/:projectId',
    { config: { tokenCheckedByHandler: true }, schema: { tags: ['projects'], operationId: 'getProject', params: projectParams, response: { 200: project } } },
    async (request) => projects.get(request.user, request.params.projectId),
  );

  app.patch(
    '/:projectId',
    { schema: { tags: ['projects'], operationId: 'updateProject', params: projectParams, body: updateProjectBody, response: { 200: project } } },
    async (request) => projects.update(request.user.id, request.params.projectId, request.body),
  );

  app.delete('/:projectId', { schema: { tags: ['projects'], operationId: 'deleteProject', params: projectParams, response: { 204: noContent } } }, async (request, reply) => {
    await projects.delete(request.user.id, request.params.projectId, request.log);
    return reply.code(204).send();
  });
};
