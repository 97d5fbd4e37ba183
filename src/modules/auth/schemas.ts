import { z } from 'zod';

export const MAX_PASSWORD_BYTES = 72; // bcrypt reads only the first 72 bytes: longer is refused, never truncated.
const MIN_PASSWORD_BYTES = 8;

export const password = z
  .string()
  .refine((value) => Buffer.byteLength(value, 'utf8') >= MIN_PASSWORD_BYTES, {
    message: `must be at least ${MIN_PASSWORD_BYTES} bytes`,
  })
  .refine((value) => Buffer.byteLength(value, 'utf8') <= MAX_PASSWORD_BYTES, {
    message: `must be at most ${MAX_PASSWORD_BYTES} bytes in UTF-8`,
  });

// Trimmed before its length is checked: the address is what is left (the body limit bounds the rest).
export const email = z
  .string()
  .trim()
  .max(254)
  .toLowerCase()
  .pipe(z.email({ message: 'must be a valid email address' }));

export const displayName = z.string().trim().min(1).max(200);

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
  password: z.string().max(1024),
});
export const updateMeBody = z.strictObject({ name: displayName });
export const changePasswordBody = z.strictObject({ currentPassword: z.string().max(1024), newPassword: password });
export const deleteMeBody = z.strictObject({ password: z.string().max(1024) });

export const session = z.object({ token: z.string(), user });
export const userEnvelope = z.object({ user });

export type UserDto = z.infer<typeof user>;
