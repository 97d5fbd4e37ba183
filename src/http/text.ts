import { z } from 'zod';

/**
 * Text as PostgreSQL can store it: a text column refuses NUL (U+0000). Refused when the request is
 * validated, so that the 400 names the field; the database's own refusal, later, could not say which.
 */
export const storableText = () => z.string().refine((value) => !value.includes('\0'), { message: 'must not contain NUL (U+0000)', abort: true });
