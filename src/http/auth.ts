import { eq, sql } from 'drizzle-orm';
import { createSigner, createVerifier } from 'fast-jwt';
import type { FastifyError, FastifyInstance, FastifyRequest } from 'fastify';
import type { Db } from '../db/database.js';
import { direct } from '../db/direct.js';
import { users } from '../db/schema.js';
import { toProblem, Unauthorized } from './errors.js';
import { isUuid } from './ids.js';
import type { RateLimits } from './rate-limit.js';

export interface AuthUser {
  id: string;
  /** The version the token was issued for: current only while it equals the user row's. */
  tokenVersion: number;
}

declare module 'fastify' {
  interface FastifyRequest {
    /** The authenticated user; set by the auth hook on every route not marked `public`. */
    user: AuthUser;
    /**
     * What a route with `tokenCheckedByHandler` answers for `error`: the error itself, unless it is a
     * client error (4xx but 401) and the token is no longer current; then 401 (or the database's failure
     * to tell). For its error handler, and for the error event of a stream already answering 200.
     */
    refusal(error: Error): Promise<Error>;
    /**
     * Throws 401 (the token remembered as revoked) unless the request's token is still current: for a
     * handler that stores something long after authentication (an upload's body may take minutes).
     */
    assertTokenStillCurrent(): Promise<void>;
  }
  interface FastifyContextConfig {
    /** Marks a route that needs no bearer token. Every other route does. */
    public?: boolean;
    /**
     * The handler's own first statement reads the user's row and passes it to `assertTokenCurrent`, so
     * that a hot route (chat, reading a project) makes one round trip where it would make two. Until
     * then only the token's signature and claims are checked; a request refused before that (invalid
     * parameters or body, a rate limit) has its token checked against the row before it is answered, so
     * that a revoked token gets 401 whatever it sends. `test/modules/auth.test.ts` sends a revoked token
     * to every route.
     */
    tokenCheckedByHandler?: boolean;
  }
}

interface TokenClaims {
  sub: string;
  email: string;
  /** The user's token version when issued; a password change bumps it and so revokes the token. */
  ver: number;
  iat: number;
  exp: number;
}

export interface Tokens {
  issue(user: { id: string; email: string; tokenVersion: number }): string;
  /** Verifies signature, algorithm and claims; throws Unauthorized on anything else, or once `revoke`d. */
  verify(token: string): TokenClaims;
  /** Remembers a token found no longer current (`StaleToken`): it stays so, as a user's version only goes up. */
  revoke(token: string): void;
}

/** A token whose user is gone or whose version is no longer the user's (a password change revoked it). */
class StaleToken extends Unauthorized {
  constructor() {
    super('Invalid or expired token');
  }
}

/** Tokens verified lately, each kept until it expires or this many newer ones push it out. */
const VERIFIED_TOKENS = 10_000;

export function createTokens(secret: string, expiresInSeconds: number): Tokens {
  const sign = createSigner({ key: secret, algorithm: 'HS256', expiresIn: expiresInSeconds * 1000 });
  const verify = createVerifier({
    key: secret,
    // Pinned: `none`, HS512, RS256 (with the secret as a "public key") and the rest are all rejected.
    algorithms: ['HS256'],
    // fast-jwt accepts a token without `exp` unless told it is required.
    requiredClaims: ['sub', 'exp', 'iat'],
  });
  // A token is the same string on each request of a session, and it verifies the same way until it expires,
  // so a verified one is looked up by itself. fast-jwt's own cache looks a token up by its SHA-256, which
  // costs about what verifying it again does; this saves the HMAC, the decoding and the claims' checks.
  // Only verified tokens are kept, and one that has expired is verified again (and refused).
  const verified = new Map<string, TokenClaims>();
  // Tokens found stale, refused from then on before anything is counted for their user: a route that checks
  // the token in its own statement counts the request against the user first (see `registerAuthentication`),
  // so that without this a revoked token, stolen, could keep its owner at 429 until it expired. Counted
  // against its user once per instance; a token pushed out by newer ones is found stale again.
  const revoked = new Set<string>();
  // The oldest entry goes first: a Map and a Set iterate in the order of insertion.
  const makeRoom = (kept: Map<string, unknown> | Set<string>) => {
    if (kept.size >= VERIFIED_TOKENS) kept.delete(kept.keys().next().value!);
  };
  return {
    issue: (user) => sign({ sub: user.id, email: user.email, ver: user.tokenVersion }),
    revoke(token) {
      verified.delete(token);
      if (revoked.has(token)) return;
      makeRoom(revoked);
      revoked.add(token);
    },
    verify(token) {
      if (revoked.has(token)) throw new Unauthorized('Invalid or expired token');
      const known = verified.get(token);
      if (known && Date.now() < known.exp * 1000) return known;
      let claims: Partial<TokenClaims>;
      try {
        claims = verify(token) as Partial<TokenClaims>;
      } catch {
        throw new Unauthorized('Invalid or expired token');
      }
      if (typeof claims.sub !== 'string' || !isUuid(claims.sub) || typeof claims.ver !== 'number') {
        throw new Unauthorized('Invalid or expired token');
      }
      makeRoom(verified);
      verified.set(token, claims as TokenClaims);
      return claims as TokenClaims;
    },
  };
}

/** The token of a request's `Authorization: Bearer …` (the scheme in any case); 401 without one. */
export function bearerToken(request: FastifyRequest): string {
  const header = request.headers.authorization;
  const match = header ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
  if (!match) throw new Unauthorized('A bearer token is required');
  return match[1]!;
}

/**
 * Every route needs a valid token unless its config says `public: true`. The token is checked against
 * the user's row (one primary-key lookup, or the handler's own statement: `tokenCheckedByHandler`) so
 * that deleted users and revoked tokens are refused. Every
 * authenticated request counts against its user's rate limit; one that fails authentication counts
 * against its address, so that guessing tokens is limited like using them.
 */
export function registerAuthentication(app: FastifyInstance, db: Db, tokens: Tokens, limits: RateLimits): void {
  app.decorateRequest('user', null as unknown as AuthUser);
  const userRow = direct(db.select({ tokenVersion: users.tokenVersion }).from(users).where(eq(users.id, sql.placeholder('id'))).prepare('auth_user_row'));
  /** Throws StaleToken, and remembers it (`Tokens.revoke`), unless the request's token is current by `row`. */
  const assertCurrent = (request: FastifyRequest, user: AuthUser, row: { tokenVersion: number | null } | undefined) => {
    try {
      assertTokenCurrent(user, row);
    } catch (error) {
      tokens.revoke(bearerToken(request));
      throw error;
    }
  };
  const authenticate = async (request: FastifyRequest) => {
    const { config } = request.routeOptions;
    try {
      const claims = tokens.verify(bearerToken(request));
      const user = { id: claims.sub, tokenVersion: claims.ver };
      if (!config.tokenCheckedByHandler) assertCurrent(request, user, (await userRow.execute({ id: user.id }))[0]);
      request.user = user;
    } catch (error) {
      if (error instanceof Unauthorized) await limits.countAnonymous(request);
      throw error;
    }
    await limits.countUser(request);
  };
  // A route that checks the token in its own statement answers a client error (4xx), its own or one
  // raised before its handler ran, only once the token is known to be current: a token that no longer
  // is gets 401, not a hint about its request. One lookup more, on refusals only. What this handler
  // throws, the app's answers: the refusal itself, 401, or the database's failure (503).
  app.decorateRequest('refusal', async function (this: FastifyRequest, error: Error): Promise<Error> {
    if (error instanceof StaleToken) tokens.revoke(bearerToken(this));
    const { status } = toProblem(error, this);
    if (!this.user || status < 400 || status >= 500 || status === 401) return error;
    try {
      assertCurrent(this, this.user, (await userRow.execute({ id: this.user.id }))[0]);
      return error;
    } catch (refused) {
      return refused as Error;
    }
  });
  app.decorateRequest('assertTokenStillCurrent', async function (this: FastifyRequest): Promise<void> {
    assertCurrent(this, this.user, (await userRow.execute({ id: this.user.id }))[0]);
  });
  const checkTokenBeforeRefusing = async (error: FastifyError, request: FastifyRequest): Promise<never> => {
    throw await request.refusal(error);
  };
  // A hook of each route that needs a token, not of the app: the public ones (health probes, docs,
  // metrics, sign-up and login) do not pay for an async hook on every request. Route hooks run after
  // the app's, as this one did registered last.
  app.addHook('onRoute', (route) => {
    if (route.config?.public) return;
    route.onRequest = [...[route.onRequest ?? []].flat(), authenticate];
    if (route.config?.tokenCheckedByHandler) route.errorHandler = checkTokenBeforeRefusing;
  });
}

/** Throws 401 unless `row`, the token's user as stored, exists and still has the token's version. */
export function assertTokenCurrent(user: AuthUser, row: { tokenVersion: number | null } | undefined): void {
  if (row?.tokenVersion !== user.tokenVersion) throw new StaleToken();
}
