import { z } from 'zod';

/**
 * A string refinement (`.refine(...withoutNul)`): no NUL (U+0000). A text column refuses it, and bcrypt
 * reads a password only up to it; refused when the request is validated, so that the 400 names the field.
 */
export const withoutNul = [(value: string) => !value.includes('\0'), { message: 'must not contain NUL (U+0000)', abort: true }] as const;

/** Text as PostgreSQL can store it; the database's own refusal, later, could not say which field. */
export const storableText = () => z.string().refine(...withoutNul);
