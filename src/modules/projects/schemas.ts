import { z } from 'zod';
import { nameText, storableText } from '../../http/text.js';
import { idSortKey, pageOf, pageQuery } from '../../http/pagination.js';
import { patchBody } from '../../http/patch.js';

const name = nameText();
const description = storableText().max(2000).nullable();
// A null provider or model means the server's default (AI_PROVIDER, AI_MODEL).
const provider = z.enum(['openai', 'openrouter']).nullable();
const model = nameText().nullable();

export const createProjectBody = z.strictObject({
  name,
  description: description.optional(),
  provider: provider.optional(),
  model: model.optional(),
});

export const updateProjectBody = patchBody({ name, description, provider, model });

/** The `:projectId` of every route under a project; prompts, messages, chat and files extend it. */
export const projectParams = z.object({ projectId: z.string() });
const count = z.number().int().nonnegative();

export const project = z
  .object({
    id: z.uuid(),
    name: z.string(),
    description: z.string().nullable(),
    provider,
    model: z.string().nullable(),
    createdAt: z.iso.datetime(),
    updatedAt: z.iso.datetime(),
    counts: z.object({ prompts: count, messages: count, files: count }),
  })
  .meta({ id: 'Project' });

export const projectListQuery = pageQuery(idSortKey);
export const projectPage = pageOf(project);

export type ProjectDto = z.infer<typeof project>;
export type CreateProjectInput = z.infer<typeof createProjectBody>;
export type UpdateProjectInput = z.infer<typeof updateProjectBody>;
