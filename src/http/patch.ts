import { z } from 'zod';

/** The body of a PATCH: any of `fields`, no others, and at least one (an empty PATCH is a client mistake). */
export function patchBody<Fields extends z.ZodRawShape>(fields: Fields) {
  return z
    .strictObject(fields)
    .partial()
    .refine((patch) => Object.keys(patch).length > 0, { message: 'must set at least one field' })
    // What the refinement says, in the document: no refinement reaches the JSON Schema.
    .meta({ minProperties: 1 });
}
