import { z } from 'zod';
import { nameText, withoutNul } from '../../http/text.js';

export const MAX_PASSWORD_BYTES = 72; // bcrypt reads only the first 72 bytes: longer is refused, never truncated.
export const MIN_PASSWORD_BYTES = 8;

/**
 * A password as it is hashed and compared: in Unicode's composed form (NFC, as RFC 8265 has it), so that
 * an accent sent as one character or as a letter and a combining mark, as keyboards and systems differ
 * in sending it, is the same password.
 */
export const normalizePassword = (value: string) => value.normalize('NFC');

/**
 * No password of more characters composes to 72 bytes or fewer. A longer one is refused before it is
 * composed, which takes time quadratic in a run of combining marks (100,000, 200 KB, held the event loop 5 s).
 */
const MAX_PASSWORD_LENGTH = 1024;

// Its bytes are counted as it is hashed: composed.
export const password = z
  .string()
  .max(MAX_PASSWORD_LENGTH, { abort: true, message: `must be at most ${MAX_PASSWORD_BYTES} bytes in UTF-8` })
  // A lone surrogate would be hashed as U+FFFD (bcrypt hashes UTF-8), so that any other would match it.
  .refine((value) => !/\p{Surrogate}/u.test(value), { message: 'must be valid Unicode: a UTF-16 surrogate without its other half', abort: true })
  // bcrypt reads a password up to its first NUL: `abcd\0abcd` would be `abcd`, and eight NULs no password at all.
  .refine(...withoutNul)
  .overwrite(normalizePassword)
  .refine((value) => Buffer.byteLength(value, 'utf8') >= MIN_PASSWORD_BYTES, {
    message: `must be at least ${MIN_PASSWORD_BYTES} bytes`,
  })
  .refine((value) => Buffer.byteLength(value, 'utf8') <= MAX_PASSWORD_BYTES, {
    message: `must be at most ${MAX_PASSWORD_BYTES} bytes in UTF-8`,
  })
  // The document's maxLength is the check before the rest: the rule itself is in bytes, which no
  // keyword of its own says (and not in characters: three may compose to one of two bytes).
  .meta({ description: `${MIN_PASSWORD_BYTES} to ${MAX_PASSWORD_BYTES} bytes in UTF-8, once composed (NFC); no NUL` });

// Trimmed before its length is checked: the address is what is left (the body limit bounds the rest).
// Checked before it is lower-cased: some characters that no address may hold lower-case to ASCII (the
// Kelvin sign to `k`), and `\u212Aate@…` signed in to `kate@…`'s account.
export const email = z
  .string()
  .trim()
  .max(254)
  .pipe(z.email({ message: 'must be a valid email address' }).toLowerCase());

export const displayName = nameText();

export const user = z
  .object({
    id: z.uuid(),
    email: z.string(),
    name: z.string(),
    createdAt: z.iso.datetime(),
  })
  .meta({ id: 'User' });

export const registerBody = z.strictObject({ email, password, name: displayName });
export const loginBody = z.strictObject({
  email,
  // Not the password rule: a login with any string is answered with the same 401 as a wrong password.
  password: z.string().max(MAX_PASSWORD_LENGTH),
});
export const updateMeBody = z.strictObject({ name: displayName });
export const changePasswordBody = z.strictObject({ currentPassword: z.string().max(MAX_PASSWORD_LENGTH), newPassword: password });
export const deleteMeBody = z.strictObject({ password: z.string().max(MAX_PASSWORD_LENGTH) });

export const session = z.object({ token: z.string(), user });
export const userEnvelope = z.object({ user });

export type UserDto = z.infer<typeof user>;
