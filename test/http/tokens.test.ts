import { afterEach, describe, expect, it, vi } from 'vitest';
import { createTokens } from '../../src/http/auth.js';
import { uuidv7 } from '../../src/db/ids.js';

const user = { id: uuidv7(), email: 'someone@example.com', tokenVersion: 3 };

describe('verified tokens, kept for the next request of the session', () => {
  afterEach(() => vi.useRealTimers());

  it('answer with the same claims while the token lasts, and refuse it once it has expired', () => {
    vi.useFakeTimers({ toFake: ['Date'] });
    const tokens = createTokens('s'.repeat(64), 60);
    const token = tokens.issue(user);
    const first = tokens.verify(token);
    expect([first.sub, first.ver]).toEqual([user.id, 3]);
    vi.setSystemTime(Date.now() + 59_000);
    expect(tokens.verify(token)).toEqual(first);
    vi.setSystemTime(Date.now() + 1_000);
    expect(() => tokens.verify(token)).toThrow('Invalid or expired token');
  });

  it('do not vouch for another string: a token altered after its genuine self was verified is refused', () => {
    const tokens = createTokens('s'.repeat(64), 60);
    const token = tokens.issue(user);
    tokens.verify(token);
    const [header, payload, signature] = token.split('.') as [string, string, string];
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString()) as Record<string, unknown>;
    const raised = Buffer.from(JSON.stringify({ ...claims, ver: 4 })).toString('base64url');
    expect(() => tokens.verify(`${header}.${raised}.${signature}`)).toThrow('Invalid or expired token');
    // Nor a token of another secret's that happens to be kept by this one's verifier.
    expect(() => createTokens('t'.repeat(64), 60).verify(token)).toThrow('Invalid or expired token');
  });

  it('refuse a token once it is found stale, and only that one', () => {
    const tokens = createTokens('s'.repeat(64), 60);
    const stale = tokens.issue(user);
    const current = tokens.issue({ ...user, tokenVersion: 4 });
    tokens.verify(stale);
    tokens.revoke(stale);
    expect(() => tokens.verify(stale)).toThrow('Invalid or expired token');
    expect(tokens.verify(current).ver).toBe(4);
  });
});
