import { z } from 'zod';
import { nameText, spokenText } from '../../http/text.js';
import { idSortKey, pageOf, pageQuery } from '../../http/pagination.js';
import { patchBody } from '../../http/patch.js';
import { projectParams } from '../projects/schemas.js';

const title = nameText();
const content = spokenText().max(100_000);

export const createPromptBody = z.strictObject({ title, content });
export const updatePromptBody = patchBody({ title, content });

export const promptParams = projectParams.extend({ promptId: z.string() });

export const prompt = z
  .object({
    id: z.uuid(),
    projectId: z.uuid(),
    title: z.string(),
    content: z.string(),
    createdAt: z.iso.datetime(),
    updatedAt: z.iso.datetime(),
  })
  .meta({ id: 'Prompt' });

export const promptListQuery = pageQuery(idSortKey);
export const promptPage = pageOf(prompt);

export type PromptDto = z.infer<typeof prompt>;
export type CreatePromptInput = z.infer<typeof createPromptBody>;
export type UpdatePromptInput = z.infer<typeof updatePromptBody>;
