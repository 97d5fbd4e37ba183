import { generateKeyPairSync, randomUUID } from 'node:crypto';
import bcrypt from 'bcrypt';
import { eq } from 'drizzle-orm';
import { createSigner } from 'fast-jwt';
import { v7 as uuidv7 } from 'uuid';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { files, messages, projects, prompts, users } from '../../src/db/schema.js';
import {
  createProject,
  createPrompt,
  expectProblem,
  insertMessages,
  registerUser,
  revokeTokens,
  startTestApp,
  startTestAppWithUpstream,
  TEST_SECRET,
  type TestApp,
  uniqueEmail,
} from '../support/app.js';

let t: TestApp;
beforeAll(async () => {
  t = await startTestApp({ BCRYPT_ROUNDS: '5' });
});
afterAll(() => t.close());

const register = (payload: unknown) => t.app.inject({ method: 'POST', url: '/api/v1/auth/register', payload: payload as object });
const login = (payload: unknown) => t.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: payload as object });
const me = (authorization?: string) =>
  t.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: authorization ? { authorization } : {} });

describe('register', () => {
  it('creates an account and returns a token and the public user', async () => {
    const email = uniqueEmail('Reg');
    const response = await register({ email: `  ${email.toUpperCase()} `, password: 'password-1', name: ' Ann ' });
    expect(response.statusCode).toBe(201);
    const body = response.json();
    expect(Object.keys(body).sort()).toEqual(['token', 'user']);
    expect(Object.keys(body.user).sort()).toEqual(['createdAt', 'email', 'id', 'name']);
    expect(body.user.email).toBe(email.toLowerCase());
    expect(body.user.name).toBe('Ann');
    expect(body.user.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7/); // UUID v7
    expect(new Date(body.user.createdAt).toISOString()).toBe(body.user.createdAt);
    expect(response.body).not.toContain('$2b$');
    // What it made: the account, which its token reads at /me.
    expect(response.headers.location).toBe('/api/v1/auth/me');
  });

  it('stores a bcrypt hash at the configured cost, never the password', async () => {
    const user = await registerUser(t.app, { password: 'plain-text-secret' });
    const [row] = await t.testDb.database.db.select().from(users).where(eq(users.id, user.id));
    expect(row!.passwordHash).toMatch(/^\$2b\$05\$/);
    expect(row!.passwordHash).not.toContain('plain-text-secret');
    expect(await bcrypt.compare('plain-text-secret', row!.passwordHash)).toBe(true);
  });

  it('takes an address of 254 characters with spaces around it, its length counted once trimmed', async () => {
    const local = `u${randomUUID().replaceAll('-', '')}`.padEnd(64, 'a');
    const address = `${local}@${'b'.repeat(60)}.${'c'.repeat(60)}.${'d'.repeat(63)}.com`;
    expect(address).toHaveLength(254);
    const registered = await register({ email: `    ${address}    `, password: 'password-1', name: 'Long' });
    expect(registered.statusCode).toBe(201);
    expect(registered.json().user.email).toBe(address);
    expect((await login({ email: ` ${address.toUpperCase()} `, password: 'password-1' })).statusCode).toBe(200);
    expectProblem(await register({ email: `a${address}`, password: 'password-1', name: 'Longer' }), 400, 'VALIDATION_ERROR');
  });

  it('refuses a duplicate email in any letter case with 409, naming no account made (no Location)', async () => {
    const email = uniqueEmail('dup');
    expect((await register({ email, password: 'password-1', name: 'A' })).statusCode).toBe(201);
    for (const variant of [email, email.toUpperCase(), ` ${email.replace(/^d/, 'D')} `]) {
      const refused = await register({ email: variant, password: 'password-2', name: 'B' });
      expectProblem(refused, 409, 'CONFLICT');
      expect(refused.headers).not.toHaveProperty('location');
    }
    const rows = await t.testDb.database.db.select().from(users).where(eq(users.email, email));
    expect(rows).toHaveLength(1);
  });

  it.each([
    ['7 bytes', 'a'.repeat(7), 400],
    ['8 bytes', 'a'.repeat(8), 201],
    ['72 bytes', 'a'.repeat(72), 201],
    ['73 bytes', 'a'.repeat(73), 400],
    ['36 two-byte characters (72 bytes)', 'é'.repeat(36), 201],
    ['37 two-byte characters (74 bytes, 37 characters)', 'é'.repeat(37), 400],
    ['4 four-byte characters (16 bytes, 4 code points)', '😀'.repeat(4), 201],
    // Hashed as U+FFFD, which any other lone surrogate would have matched.
    ['a lone high surrogate', 'password\ud800', 400],
    ['a lone low surrogate', '\udfffpassword', 400],
    // bcrypt reads up to a NUL: the first would be `abcd`, the second no password at all.
    ['a NUL inside', 'abcd\u0000abcd', 400],
    ['eight NULs', '\u0000'.repeat(8), 400],
  ])('password of %s → %i', async (_, password, status) => {
    const response = await register({ email: uniqueEmail(), password, name: 'P' });
    if (status === 400) {
      const body = expectProblem(response, 400, 'VALIDATION_ERROR');
      expect(body.errors).toEqual([expect.objectContaining({ path: 'body.password' })]);
    } else {
      expect(response.statusCode).toBe(201);
      expect((await login({ email: response.json().user.email, password })).statusCode).toBe(200);
    }
  });

  it('never truncates: a 72-byte password differs from one with a 73rd byte', async () => {
    const password = 'b'.repeat(72);
    const user = await registerUser(t.app, { password });
    expect((await login({ email: user.email, password: password.slice(0, 71) + 'c' })).statusCode).toBe(401);
    // Nor is a longer one taken for the first 72 bytes, which are all that bcrypt reads.
    const longer = `${password}and more`;
    expectProblem(await login({ email: user.email, password: longer }), 401, 'UNAUTHORIZED');
    const changed = await t.app.inject({
      method: 'POST',
      url: '/api/v1/auth/password',
      headers: user.auth,
      payload: { currentPassword: longer, newPassword: 'another password' },
    });
    expectProblem(changed, 403, 'FORBIDDEN');
    const deleted = await t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: user.auth, payload: { password: longer } });
    expectProblem(deleted, 403, 'FORBIDDEN');
    expect((await login({ email: user.email, password })).statusCode).toBe(200);
  });

  it('matches no password with a lone surrogate, which bcrypt would read as U+FFFD', async () => {
    // U+FFFD is a character a password may hold; a lone surrogate is not, and was hashed as it.
    const user = await registerUser(t.app, { password: 'abcdefg\ufffd' });
    for (const password of ['abcdefg\ud800', 'abcdefg\udfff']) {
      expectProblem(await login({ email: user.email, password }), 401, 'UNAUTHORIZED');
    }
    expect((await login({ email: user.email, password: 'abcdefg\ufffd' })).statusCode).toBe(200);
  });

  it('matches no password that bcrypt reads short: a NUL in it, or under 8 bytes (for a hash made before NUL was refused)', async () => {
    const [legacy] = await t.testDb.database.db
      .insert(users)
      .values({ id: uuidv7(), email: uniqueEmail('nul'), passwordHash: bcrypt.hashSync('abcd\u0000abcd', 4), name: 'N' })
      .returning();
    expect(await bcrypt.compare('abcd', legacy!.passwordHash)).toBe(true); // what the rule guards against
    for (const password of ['abcd', 'abcd\u0000abcd', 'abcd\u0000anything', '']) {
      expectProblem(await login({ email: legacy!.email, password }), 401, 'UNAUTHORIZED');
    }
    const user = await registerUser(t.app);
    const changed = await t.app.inject({
      method: 'POST',
      url: '/api/v1/auth/password',
      headers: user.auth,
      payload: { currentPassword: user.password, newPassword: 'new\u0000password' },
    });
    expect(expectProblem(changed, 400, 'VALIDATION_ERROR').errors).toEqual([{ path: 'body.newPassword', message: 'must not contain NUL (U+0000)' }]);
  });

  it('takes a password in either Unicode form: an accent typed as one character or as a letter and a combining mark is the same', async () => {
    const composed = 'Crème brûlée, señor'.normalize('NFC');
    const decomposed = composed.normalize('NFD');
    expect(decomposed).not.toBe(composed);
    const one = await registerUser(t.app, { password: decomposed });
    const other = await registerUser(t.app, { password: composed });
    for (const user of [one, other]) {
      for (const password of [composed, decomposed]) expect((await login({ email: user.email, password })).statusCode).toBe(200);
    }
    const changed = await t.app.inject({
      method: 'POST',
      url: '/api/v1/auth/password',
      headers: one.auth,
      payload: { currentPassword: composed, newPassword: `${decomposed}!` },
    });
    expect(changed.statusCode).toBe(204);
    expect((await login({ email: one.email, password: `${composed}!` })).statusCode).toBe(200);
    // Its bytes are counted composed: 36 accented letters are 72 bytes so, 108 decomposed.
    const accents = 'é'.repeat(36).normalize('NFD');
    expect(Buffer.byteLength(accents)).toBe(108);
    const long = await registerUser(t.app, { password: accents });
    expect((await login({ email: long.email, password: accents.normalize('NFC') })).statusCode).toBe(200);
    // A hash made of a decomposed password before passwords were compared composed still matches it.
    const [legacy] = await t.testDb.database.db
      .insert(users)
      .values({ id: uuidv7(), email: uniqueEmail('legacy'), passwordHash: bcrypt.hashSync(decomposed, 4), name: 'L' })
      .returning();
    expect((await login({ email: legacy!.email, password: decomposed })).statusCode).toBe(200);
    expectProblem(await login({ email: legacy!.email, password: 'not the password' }), 401, 'UNAUTHORIZED');
    // One too long to be 72 bytes in any form is refused before it is composed: composing a run of
    // combining marks takes time quadratic in its length (seconds, the event loop held, for 100,000).
    // Past the route's body limit it is not even read (413); within it, refused by its length.
    expectProblem(await register({ email: uniqueEmail(), password: `a${'\u0301\u0316'.repeat(50_000)}`, name: 'M' }), 413, 'PAYLOAD_TOO_LARGE');
    const marks = `a${'\u0301\u0316'.repeat(5_000)}`;
    const start = performance.now();
    const body = expectProblem(await register({ email: uniqueEmail(), password: marks, name: 'M' }), 400, 'VALIDATION_ERROR');
    expect(performance.now() - start).toBeLessThan(1_000);
    expect(body.errors).toEqual([{ path: 'body.password', message: 'must be at most 72 bytes in UTF-8' }]);
  });

  it.each([
    ['missing fields', {}, ['body.email', 'body.password', 'body.name']],
    ['a bad email', { email: 'not-an-email', password: 'password-1', name: 'A' }, ['body.email']],
    ['an empty name', { email: 'x@example.com', password: 'password-1', name: '   ' }, ['body.name']],
    ['a name over 200 characters', { email: 'y@example.com', password: 'password-1', name: 'n'.repeat(201) }, ['body.name']],
    ['wrong types', { email: 5, password: true, name: [] }, ['body.email', 'body.password', 'body.name']],
    ['an unknown property', { email: 'z@example.com', password: 'password-1', name: 'A', id: uuidv7() }, ['body']],
  ])('rejects %s with the fields named', async (_, payload, paths) => {
    const body = expectProblem(await register(payload), 400, 'VALIDATION_ERROR');
    expect([...new Set((body.errors as { path: string }[]).map((e) => e.path))].sort()).toEqual([...paths].sort());
  });
});

describe('login', () => {
  it('logs in with any letter case of the email', async () => {
    const user = await registerUser(t.app);
    const response = await login({ email: user.email.toUpperCase(), password: user.password });
    expect(response.statusCode).toBe(200);
    expect(response.json().user.id).toBe(user.id);
    expect((await me(`Bearer ${response.json().token}`)).statusCode).toBe(200);
  });

  // The Kelvin sign lower-cases to `k`: `\u212Aate@…`, lower-cased before it was checked, was `kate@…`,
  // whose account it signed in to, and a sign-up with it was told the address was taken.
  it('refuses, as no address, an email whose non-ASCII letters would lower-case to another one', async () => {
    const user = await registerUser(t.app, { email: uniqueEmail('kate') });
    const lookalike = `\u212A${user.email.slice(1)}`;
    expect(lookalike.toLowerCase()).toBe(user.email);
    for (const response of [await login({ email: lookalike, password: user.password }), await register({ email: lookalike, password: user.password, name: 'K' })]) {
      expect(response.statusCode).toBe(400);
      expect(response.json().errors).toEqual([expect.objectContaining({ path: 'body.email', message: 'must be a valid email address' })]);
    }
  });

  it('answers an unknown email and a wrong password with the same 401', async () => {
    const user = await registerUser(t.app);
    const wrong = expectProblem(await login({ email: user.email, password: 'wrong-password' }), 401, 'UNAUTHORIZED');
    const unknown = expectProblem(await login({ email: uniqueEmail('nobody'), password: 'wrong-password' }), 401, 'UNAUTHORIZED');
    expect(unknown.detail).toBe(wrong.detail);
    expect(unknown.title).toBe(wrong.title);
  });

  it('hashes a password made at another cost again at the configured one when it logs in, keeping its tokens', async () => {
    // As if BCRYPT_ROUNDS had been raised since: its comparison would be quicker than an unknown email's.
    const user = await registerUser(t.app);
    const oldHash = bcrypt.hashSync(user.password, 4);
    await t.testDb.database.db.update(users).set({ passwordHash: oldHash }).where(eq(users.id, user.id));
    const storedHash = async () => (await t.testDb.database.db.select().from(users).where(eq(users.id, user.id)))[0]!.passwordHash;

    expectProblem(await login({ email: user.email, password: 'wrong-password' }), 401, 'UNAUTHORIZED');
    expect(await storedHash()).toBe(oldHash);
    expect((await login({ email: user.email, password: user.password })).statusCode).toBe(200);
    const newHash = await storedHash();
    expect(newHash).toMatch(/^\$2b\$05\$/);
    expect(bcrypt.compareSync(user.password, newHash)).toBe(true);
    // The same password: the tokens issued before still work, and the next login leaves the hash alone.
    expect((await me(user.auth.authorization)).statusCode).toBe(200);
    expect((await login({ email: user.email, password: user.password })).statusCode).toBe(200);
    expect(await storedHash()).toBe(newHash);
  });

  // A timing side channel, so timed: compared at cost 4 a wrong password took about 1 ms where an unknown
  // email's took 100 times as long (cost 11), telling which emails have accounts of a cost from before.
  it('takes as long to refuse a wrong password of a hash from a lower cost as an unknown email', async () => {
    const one = await startTestApp({ BCRYPT_ROUNDS: '11' });
    try {
      const user = await registerUser(one.app);
      await one.testDb.database.db.update(users).set({ passwordHash: bcrypt.hashSync(user.password, 4) }).where(eq(users.id, user.id));
      const refusedIn = async (email: string) => {
        const started = performance.now();
        expectProblem(await one.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email, password: 'wrong-password' } }), 401, 'UNAUTHORIZED');
        return performance.now() - started;
      };
      await refusedIn(uniqueEmail('nobody')); // the unknown emails' hash, made once
      // Alternating, so that both meet the same load; the quickest of each, what the work takes at least.
      const times = { unknown: [] as number[], known: [] as number[] };
      for (let round = 0; round < 5; round++) {
        times.unknown.push(await refusedIn(uniqueEmail('nobody')));
        times.known.push(await refusedIn(user.email));
      }
      const [unknown, known] = [Math.min(...times.unknown), Math.min(...times.known)];
      // Compared at cost 4 alone, it took a thirtieth of the time.
      expect(known, `${known.toFixed(1)} ms against ${unknown.toFixed(1)} for an unknown email`).toBeGreaterThan(unknown / 4);
    } finally {
      await one.close();
    }
  });

  it('keeps a password changed while a login hashes the old one again', async () => {
    // One hashing thread, jobs in turn: the change's comparison, the login's, the new password's hash, then
    // the login's hash of the old password, written last.
    const one = await startTestApp({ BCRYPT_ROUNDS: '5', PASSWORD_HASH_THREADS: '1' });
    try {
      const user = await registerUser(one.app);
      await one.testDb.database.db.update(users).set({ passwordHash: bcrypt.hashSync(user.password, 11) }).where(eq(users.id, user.id));
      const login = (password: string) => one.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: user.email, password } });
      const change = one.app.inject({
        method: 'POST',
        url: '/api/v1/auth/password',
        headers: user.auth,
        payload: { currentPassword: user.password, newPassword: 'new-password-1' },
      });
      // While the change's comparison at cost 11 runs (over 100 ms).
      await new Promise((resolve) => setTimeout(resolve, 40));
      const [changed, loggedIn] = await Promise.all([change, login(user.password)]);
      // The change committed while the login hashed the old password again: the old password no longer
      // signs in (a session of it would be refused at its first use, as the change revoked it).
      expect(changed.statusCode).toBe(204);
      expectProblem(loggedIn, 401, 'UNAUTHORIZED');
      const session = await login('new-password-1');
      expect(session.statusCode).toBe(200);
      expect((await one.app.inject({ method: 'GET', url: '/api/v1/auth/me', headers: { authorization: `Bearer ${session.json().token}` } })).statusCode).toBe(200);
      expectProblem(await login(user.password), 401, 'UNAUTHORIZED');
    } finally {
      await one.close();
    }
  });

  // The login's comparison waits on the one hashing thread behind the deletion's, which commits first.
  it('refuses a login whose account is deleted while its password is compared', async () => {
    const one = await startTestApp({ BCRYPT_ROUNDS: '12', PASSWORD_HASH_THREADS: '1' });
    try {
      const user = await registerUser(one.app);
      const deleted = one.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: user.auth, payload: { password: user.password } });
      // While the deletion's comparison at cost 12 runs (a quarter of a second).
      await new Promise((resolve) => setTimeout(resolve, 100));
      const login = one.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: user.email, password: user.password } });
      expect((await deleted).statusCode).toBe(204);
      expectProblem(await login, 401, 'UNAUTHORIZED');
    } finally {
      await one.close();
    }
  });

  it('spends a full bcrypt comparison on an unknown email too', async () => {
    // At cost 10 one comparison takes tens of milliseconds; a refusal that skipped it would answer in about one.
    const slow = await startTestApp({ BCRYPT_ROUNDS: '10' });
    try {
      const user = await registerUser(slow.app);
      const median = async (email: string) => {
        const times: number[] = [];
        for (let i = 0; i < 5; i++) {
          const start = performance.now();
          await slow.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email, password: 'wrong-password' } });
          times.push(performance.now() - start);
        }
        return times.sort((a, b) => a - b)[2]!;
      };
      await median(uniqueEmail('warmup'));
      const known = await median(user.email);
      const unknown = await median(uniqueEmail('nobody'));
      // Without the comparison the ratio would be about 0.02; other test files share the CPU, hence the margin.
      expect(unknown).toBeGreaterThan(known * 0.3);
    } finally {
      await slow.close();
    }
  });
});

// A key pair of an attacker's own: asymmetric algorithms are refused whatever key signed the token.
const rsaPrivateKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();

describe('tokens', () => {
  const b64 = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const now = () => Math.floor(Date.now() / 1000);

  async function forgeries(user: { id: string; email: string; token: string }) {
    const claims = { sub: user.id, email: user.email, ver: 0 };
    const [header, payload, signature] = user.token.split('.') as [string, string, string];
    const hs256 = createSigner({ key: TEST_SECRET, algorithm: 'HS256' });
    return {
      'alg none': `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ ...claims, iat: now(), exp: now() + 60 })}.`,
      'alg NoNe': `${b64({ alg: 'NoNe', typ: 'JWT' })}.${b64({ ...claims, iat: now(), exp: now() + 60 })}.`,
      HS512: createSigner({ key: TEST_SECRET, algorithm: 'HS512', expiresIn: 60_000 })(claims),
      HS384: createSigner({ key: TEST_SECRET, algorithm: 'HS384', expiresIn: 60_000 })(claims),
      RS256: createSigner({ key: rsaPrivateKey, algorithm: 'RS256', expiresIn: 60_000 })(claims),
      'another secret': createSigner({ key: 'x'.repeat(48), algorithm: 'HS256', expiresIn: 60_000 })(claims),
      'tampered payload': `${header}.${b64({ ...claims, sub: uuidv7(), iat: now(), exp: now() + 60 })}.${signature}`,
      'tampered signature': `${header}.${payload}.${signature.slice(0, -4)}${signature.endsWith('AAAA') ? 'BBBB' : 'AAAA'}`,
      expired: hs256({ ...claims, iat: now() - 120, exp: now() - 60 }),
      'without exp': hs256({ ...claims, iat: now() }),
      'without sub': hs256({ email: user.email, ver: 0, iat: now(), exp: now() + 60 }),
      'with a sub that is not a uuid': hs256({ ...claims, sub: "1' or '1'='1", iat: now(), exp: now() + 60 }),
      'not yet valid': createSigner({ key: TEST_SECRET, algorithm: 'HS256', expiresIn: 60_000, notBefore: 60_000 })(claims),
      'garbage': 'not.a.jwt',
    };
  }

  it('accepts the issued token, with HS256 and sub, email, iat, exp', async () => {
    const user = await registerUser(t.app);
    const [header, payload] = user.token
      .split('.')
      .slice(0, 2)
      .map((part) => JSON.parse(Buffer.from(part, 'base64url').toString()));
    expect(header.alg).toBe('HS256');
    expect(payload).toMatchObject({ sub: user.id, email: user.email });
    expect(payload.exp - payload.iat).toBe(7 * 24 * 3600);
    expect((await me(user.auth.authorization)).json().user.id).toBe(user.id);
  });

  it('refuses every forged or unusable token with 401, on a route that checks the token in its own statement too', async () => {
    const user = await registerUser(t.app);
    const project = await createProject(t.app, user);
    for (const [name, token] of Object.entries(await forgeries(user))) {
      for (const response of [
        await me(`Bearer ${token}`),
        await t.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers: { authorization: `Bearer ${token}` } }),
      ]) {
        expect(response.statusCode, name).toBe(401);
        expectProblem(response, 401, 'UNAUTHORIZED');
      }
    }
  });

  it('refuses a missing or malformed Authorization header', async () => {
    expectProblem(await me(), 401, 'UNAUTHORIZED');
    expectProblem(await me('Basic dXNlcjpwYXNz'), 401, 'UNAUTHORIZED');
    expectProblem(await me('Bearer'), 401, 'UNAUTHORIZED');
  });

  it('refuses a valid token of a user who no longer exists', async () => {
    const user = await registerUser(t.app);
    await t.testDb.database.db.delete(users).where(eq(users.id, user.id));
    expectProblem(await me(user.auth.authorization), 401, 'UNAUTHORIZED');
  });
});

describe('profile, password change and account deletion', () => {
  it('reads and updates the profile', async () => {
    const user = await registerUser(t.app, { name: 'Before' });
    const patched = await t.app.inject({ method: 'PATCH', url: '/api/v1/auth/me', headers: user.auth, payload: { name: 'After' } });
    expect(patched.statusCode).toBe(200);
    expect(patched.json().user).toMatchObject({ id: user.id, name: 'After', email: user.email });
    expect((await me(user.auth.authorization)).json().user.name).toBe('After');
  });

  it('refuses to change the email or id through the profile', async () => {
    const user = await registerUser(t.app);
    for (const payload of [{ email: 'other@example.com' }, { name: 'X', id: uuidv7() }, { name: 'X', passwordHash: 'x' }, {}]) {
      expectProblem(await t.app.inject({ method: 'PATCH', url: '/api/v1/auth/me', headers: user.auth, payload }), 400, 'VALIDATION_ERROR');
    }
    expect((await me(user.auth.authorization)).json().user).toMatchObject({ email: user.email, name: 'Test User' });
  });

  it('changes the password and revokes every token issued before', async () => {
    const user = await registerUser(t.app);
    const second = (await login({ email: user.email, password: user.password })).json().token as string;
    const change = (body: object, auth = user.auth) =>
      t.app.inject({ method: 'POST', url: '/api/v1/auth/password', headers: auth, payload: body });

    // The token is good and the password is wrong: 403, not the 401 on which a client would sign its user out.
    const wrong = await change({ currentPassword: 'not-the-password', newPassword: 'new-password-1' });
    expect(expectProblem(wrong, 403, 'FORBIDDEN').detail).toBe('The password is wrong');
    expect(wrong.headers['www-authenticate']).toBeUndefined();
    expectProblem(await change({ currentPassword: user.password, newPassword: 'short' }), 400, 'VALIDATION_ERROR');
    expect((await me(user.auth.authorization)).statusCode).toBe(200);

    const changed = await change({ currentPassword: user.password, newPassword: 'new-password-1' });
    expect(changed.statusCode).toBe(204);
    expect(changed.body).toBe('');
    expectProblem(await me(user.auth.authorization), 401, 'UNAUTHORIZED');
    expectProblem(await me(`Bearer ${second}`), 401, 'UNAUTHORIZED');

    expectProblem(await login({ email: user.email, password: user.password }), 401, 'UNAUTHORIZED');
    const fresh = await login({ email: user.email, password: 'new-password-1' });
    expect(fresh.statusCode).toBe(200);
    expect((await me(`Bearer ${fresh.json().token}`)).statusCode).toBe(200);
  });

  it('takes one of several password changes (or deletions) sent at once with one token: the first revokes it, so the others are 401', async () => {
    const user = await registerUser(t.app);
    const newPasswords = ['new-password-1', 'new-password-2', 'new-password-3', 'new-password-4'];
    const responses = await Promise.all(
      newPasswords.map((newPassword) =>
        t.app.inject({ method: 'POST', url: '/api/v1/auth/password', headers: user.auth, payload: { currentPassword: user.password, newPassword } }),
      ),
    );
    expect(responses.map((response) => response.statusCode).sort()).toEqual([204, 401, 401, 401]);
    for (const [i, newPassword] of newPasswords.entries()) {
      const answered = responses[i]!.statusCode;
      if (answered === 401) expectProblem(responses[i]!, 401, 'UNAUTHORIZED');
      // The password that works is the one its client was told was set.
      expect((await login({ email: user.email, password: newPassword })).statusCode).toBe(answered === 204 ? 200 : 401);
    }

    // Likewise a password change and the account's deletion: one of them, never both.
    const other = await registerUser(t.app);
    const [changed, deleted] = await Promise.all([
      t.app.inject({ method: 'POST', url: '/api/v1/auth/password', headers: other.auth, payload: { currentPassword: other.password, newPassword: 'new-password-5' } }),
      t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: other.auth, payload: { password: other.password } }),
    ]);
    expect([changed!.statusCode, deleted!.statusCode].sort()).toEqual([204, 401]);
    const [row] = await t.testDb.database.db.select().from(users).where(eq(users.id, other.id));
    expect(row !== undefined).toBe(changed!.statusCode === 204);
  });

  it('deletes the account with its password, cascading to what it owns', async () => {
    const user = await registerUser(t.app);
    const other = await registerUser(t.app);
    const { db } = t.testDb.database;
    const now = new Date();
    const project = { id: uuidv7(), userId: user.id, name: 'P', createdAt: now, updatedAt: now };
    const otherProject = { ...project, id: uuidv7(), userId: other.id };
    await db.insert(projects).values([project, otherProject]);

    const remove = (payload: object) => t.app.inject({ method: 'DELETE', url: '/api/v1/auth/me', headers: user.auth, payload });
    expectProblem(await remove({ password: 'wrong-password' }), 403, 'FORBIDDEN');
    expectProblem(await remove({}), 400, 'VALIDATION_ERROR');
    expect(await db.select().from(users).where(eq(users.id, user.id))).toHaveLength(1);

    expect((await remove({ password: user.password })).statusCode).toBe(204);
    expect(await db.select().from(users).where(eq(users.id, user.id))).toHaveLength(0);
    expect(await db.select().from(projects).where(eq(projects.userId, user.id))).toHaveLength(0);
    expect(await db.select().from(projects).where(eq(projects.id, otherProject.id))).toHaveLength(1);
    expectProblem(await me(user.auth.authorization), 401, 'UNAUTHORIZED');
    expectProblem(await login({ email: user.email, password: user.password }), 401, 'UNAUTHORIZED');
    // The email is free again.
    expect((await register({ email: user.email, password: 'password-9', name: 'Again' })).statusCode).toBe(201);
  });
});

describe('a revoked token on every route', () => {
  async function everyRow() {
    const { db } = t.testDb.database;
    return Promise.all([projects, prompts, messages, files, users].map((table) => db.select().from(table)));
  }

  it('is refused with 401 by every authenticated route, its own resources included and whatever the body, and changes nothing', async () => {
    const doc = (await t.app.inject({ method: 'GET', url: '/openapi.json' })).json() as {
      paths: Record<string, Record<string, { security?: unknown[] }>>;
    };
    const revoked = await registerUser(t.app);
    const gone = await registerUser(t.app);
    const ids: Record<string, Record<string, string>> = {};
    for (const owner of [revoked, gone]) {
      const project = await createProject(t.app, owner);
      const prompt = await createPrompt(t.app, owner, project.id);
      await insertMessages(t.testDb.database.db, project.id, 2);
      const [file] = await t.testDb.database.db
        .insert(files)
        .values({ id: uuidv7(), projectId: project.id, filename: 'a.txt', mimeType: 'text/plain', size: 1, sha256: 'f'.repeat(64), storageUrl: 'file:///nowhere' })
        .returning();
      ids[owner.id] = { projectId: project.id, promptId: prompt.id, fileId: file!.id };
    }
    await revokeTokens(t.app, revoked);
    await t.testDb.database.db.delete(users).where(eq(users.id, gone.id));
    const before = await everyRow();

    let checked = 0;
    for (const [template, operations] of Object.entries(doc.paths)) {
      for (const [method, operation] of Object.entries(operations)) {
        if (operation.security?.length === 0) continue; // public
        const key = `${method.toUpperCase()} ${template}`;
        for (const owner of [revoked, gone]) {
          const url = template.replace(/\{(\w+)\}/g, (_, name: string) => ids[owner.id]![name]!);
          // An empty body, which the routes that take one refuse: the token is what is answered.
          const response = await t.app.inject({ method: method.toUpperCase() as 'GET', url, headers: owner.auth, payload: {} });
          expect({ route: key, status: response.statusCode }).toEqual({ route: key, status: 401 });
          // A HEAD's answer has its GET's headers, without the body.
          if (method === 'head') expect(response.headers['www-authenticate']).toBe('Bearer');
          else expectProblem(response, 401, 'UNAUTHORIZED');
          checked++;
        }
      }
    }
    expect(checked).toBeGreaterThanOrEqual(2 * 30);
    expect(await everyRow()).toEqual(before);
  });

  it('is refused with 401 where a current token is refused otherwise (a malformed id, an invalid body, a rate limit)', async () => {
    const limited = await startTestApp({ RATE_LIMIT_CHAT: '1' });
    try {
      const user = await registerUser(limited.app);
      const project = await createProject(limited.app, user);
      const requests = [
        { method: 'GET', url: '/api/v1/projects/not-an-id' },
        { method: 'POST', url: `/api/v1/projects/${project.id}/chat`, payload: { message: '' } },
        { method: 'POST', url: `/api/v1/projects/${project.id}/chat`, payload: { stream: 'yes' } },
      ] as const;
      const send = (request: (typeof requests)[number]) => limited.app.inject({ ...request, headers: user.auth });
      expectProblem(await send(requests[0]), 404, 'NOT_FOUND');
      expectProblem(await send(requests[1]), 400, 'VALIDATION_ERROR'); // the chat limit's one request
      expectProblem(await send(requests[2]), 429, 'RATE_LIMITED');
      await revokeTokens(limited.app, user);
      for (const request of requests) expectProblem(await send(request), 401, 'UNAUTHORIZED');
    } finally {
      await limited.close();
    }
  });

  it("does not spend its owner's limits where the route checks it in its own statement (a chat, a project): its owner is not locked out", async () => {
    const limited = await startTestAppWithUpstream({ RATE_LIMIT_CHAT: '2', RATE_LIMIT_API: '5' });
    try {
      const user = await registerUser(limited.app);
      const project = await createProject(limited.app, user);
      const stolen = user.auth;
      await revokeTokens(limited.app, user);
      const signedIn = await limited.app.inject({ method: 'POST', url: '/api/v1/auth/login', payload: { email: user.email, password: 'another-password-1' } });
      const owner = { authorization: `Bearer ${signedIn.json().token}` };
      const chat = (headers: Record<string, string>) =>
        limited.app.inject({ method: 'POST', url: `/api/v1/projects/${project.id}/chat`, headers, payload: { message: 'Hello' } });
      const read = (headers: Record<string, string>) => limited.app.inject({ method: 'GET', url: `/api/v1/projects/${project.id}`, headers });
      // Found stale by the first, each after it is refused before its user is known, counted against its address.
      for (let attempt = 0; attempt < 3; attempt++) {
        expectProblem(await chat(stolen), 401, 'UNAUTHORIZED');
        expectProblem(await read(stolen), 401, 'UNAUTHORIZED');
      }
      expect((await chat(owner)).statusCode).toBe(200);
      expect((await read(owner)).statusCode).toBe(200);
    } finally {
      await limited.close();
    }
  });
});
