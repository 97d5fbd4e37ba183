import { z } from 'zod';

/**
 * A string refinement (`.refine(...withoutNul)`): no NUL (U+0000). A text column refuses it, and bcrypt
 * reads a password only up to it; refused when the request is validated, so that the 400 names the field.
 */
export const withoutNul = [(value: string) => !value.includes('\0'), { message: 'must not contain NUL (U+0000)', abort: true }] as const;

/** Text as PostgreSQL can store it; the database's own refusal, later, could not say which field. */
export const storableText = () => z.string().refine(...withoutNul);

/**
 * Text that says something: one character at least that is not white space. A prompt or a question of
 * spaces and newlines alone went upstream as one, which some models refuse and none can answer.
 */
export const spokenText = () => storableText().regex(/\S/, { message: 'must not be blank' });
