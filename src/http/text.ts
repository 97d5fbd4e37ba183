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

/**
 * A name (a project's, a prompt's title, a user's, a model's): stored trimmed, of 1 to 200 characters
 * then. The document says that one of them must not be white space, as the trim does: its `minLength`
 * alone let a validating client send a name of spaces, which the service then refused.
 */
export const nameText = () => storableText().trim().min(1).max(200).meta({ pattern: '\\S' });
