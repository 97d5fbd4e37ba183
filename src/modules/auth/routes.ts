import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { clientGoneSignal } from '../../http/errors.js';
import { noContent } from '../../http/openapi.js';
import {
  changePasswordBody,
  deleteMeBody,
  loginBody,
  registerBody,
  session,
  updateMeBody,
  userEnvelope,
} from './schemas.js';
import type { AuthService } from './service.js';

export const authRoutes: FastifyPluginAsyncZod<{ auth: AuthService }> = async (app, { auth }) => {
  // The password hashing threads end with the app, so that a closed app (tests, graceful shutdown) leaves none behind.
  app.addHook('onClose', () => auth.close());

  app.post(
    '/register',
    {
      config: { public: true, rateLimitGroup: 'register' },
      schema: { tags: ['auth'], operationId: 'register', body: registerBody, response: { 201: session }, problems: ['CONFLICT'] },
    },
    // What it made is the caller's account, which a token reads at /me. Named once it is made: a header
    // set first stayed on a refusal (409, 503).
    async (request, reply) => {
      const session = await auth.register(request.body, clientGoneSignal(reply));
      return reply.code(201).header('location', '/api/v1/auth/me').send(session);
    },
  );

  app.post(
    '/login',
    {
      config: { public: true, rateLimitGroup: 'login' },
      schema: { tags: ['auth'], operationId: 'login', body: loginBody, response: { 200: session }, problems: ['UNAUTHORIZED'] },
    },
    async (request, reply) => auth.login(request.body, request.log, clientGoneSignal(reply)),
  );

  app.get('/me', { schema: { tags: ['auth'], operationId: 'getMe', response: { 200: userEnvelope } } }, async (request) => ({
    user: await auth.me(request.user.id),
  }));

  app.patch(
    '/me',
    { schema: { tags: ['auth'], operationId: 'updateMe', body: updateMeBody, response: { 200: userEnvelope } } },
    async (request) => ({ user: await auth.updateMe(request.user.id, request.body) }),
  );

  // Both check the caller's password: limited like logins (src/http/rate-limit.ts).
  app.post(
    '/password',
    { config: { rateLimitGroup: 'password' }, schema: { tags: ['auth'], operationId: 'changePassword', body: changePasswordBody, response: { 204: noContent }, problems: ['FORBIDDEN'] } },
    async (request, reply) => {
      await auth.changePassword(request.user, request.body, clientGoneSignal(reply));
      return reply.code(204).send();
    },
  );

  app.delete(
    '/me',
    { config: { rateLimitGroup: 'password' }, schema: { tags: ['auth'], operationId: 'deleteMe', body: deleteMeBody, response: { 204: noContent }, problems: ['FORBIDDEN'] } },
    async (request, reply) => {
      await auth.deleteMe(request.user, request.body, request.log, clientGoneSignal(reply));
      return reply.code(204).send();
    },
  );
};
