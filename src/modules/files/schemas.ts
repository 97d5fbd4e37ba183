import { z } from 'zod';
import { pageOf, pageQuery, timeSortKey } from '../../http/pagination.js';
import { projectParams } from '../projects/schemas.js';

export const fileParams = projectParams.extend({ fileId: z.string() });

export const file = z
  .object({
    id: z.uuid(),
    projectId: z.uuid(),
    filename: z.string(),
    mimeType: z.string(),
    size: z.number().int().nonnegative(),
    sha256: z.string(),
    providerFileId: z.string().nullable(),
    createdAt: z.iso.datetime(),
  })
  .meta({ id: 'File' });

export const fileListQuery = pageQuery(timeSortKey);
export const filePage = pageOf(file);

export type FileDto = z.infer<typeof file>;
