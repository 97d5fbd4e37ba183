import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { createProviders } from '../../src/providers/registry.js';
import { type ChatRequest, ProviderNotConfigured } from '../../src/providers/types.js';
import { FakeUpstream } from '../support/fake-upstream.js';

let fake: FakeUpstream;
beforeAll(async () => {
  fake = await FakeUpstream.start();
});
afterAll(() => fake.close());
beforeEach(() => fake.reset());

function providers(env: Record<string, string>) {
  return createProviders(loadConfig({ NODE_ENV: 'test', JWT_SECRET: 'a-test-secret-of-at-least-32-characters', ...env }));
}

function chat(model: string): ChatRequest {
  return { model, messages: [{ role: 'user', content: 'Hi' }], maxOutputTokens: 16, signal: AbortSignal.timeout(10_000) };
}

describe('resolve', () => {
  it('gives the AI_PROVIDER provider and its default model to a project that names neither', () => {
    const { adapter, model } = providers({ OPENAI_API_KEY: 'sk-openai' }).resolve(null, null);
    expect(adapter).toMatchObject({ name: 'openai', supportsFiles: true });
    expect(model).toBe('gpt-4o-mini');
  });

  it('uses AI_MODEL for the default provider only, and the project model over both', () => {
    const registry = providers({ AI_PROVIDER: 'openai', AI_MODEL: 'gpt-4.1', OPENAI_API_KEY: 'sk-openai', OPENROUTER_API_KEY: 'sk-or' });
    expect(registry.resolve(null, null).model).toBe('gpt-4.1');
    expect(registry.resolve('openai', 'o4-mini').model).toBe('o4-mini');
    expect(registry.resolve('openrouter', null)).toMatchObject({ adapter: { name: 'openrouter', supportsFiles: false }, model: 'openai/gpt-4o-mini' });
    expect(registry.resolve('openrouter', 'anthropic/claude-sonnet-4').model).toBe('anthropic/claude-sonnet-4');
  });

  it('keeps one adapter per provider', () => {
    const registry = providers({ OPENAI_API_KEY: 'sk-openai' });
    expect(registry.resolve(null, 'a').adapter).toBe(registry.resolve('openai', 'b').adapter);
    expect(registry.get('openai')).toBe(registry.resolve(null, null).adapter);
  });

  it('throws ProviderNotConfigured (503) for a provider with neither key nor base URL', () => {
    const none = providers({});
    expect(() => none.resolve(null, null)).toThrow(ProviderNotConfigured);
    const openaiOnly = providers({ OPENAI_API_KEY: 'sk-openai' });
    expect(() => openaiOnly.resolve('openrouter', null)).toThrow(ProviderNotConfigured);
    expect(openaiOnly.get('openrouter')).toBeUndefined();
    expect(new ProviderNotConfigured('openai')).toMatchObject({ status: 503, code: 'PROVIDER_NOT_CONFIGURED' });
  });

  it('configures the default provider by AI_BASE_URL alone, without a Files API, and no other provider', async () => {
    const registry = providers({ AI_PROVIDER: 'openai', AI_BASE_URL: fake.url, AI_MODEL: 'llama3.2' });
    const { adapter, model } = registry.resolve(null, null);
    expect(adapter.supportsFiles).toBe(false);
    expect(() => registry.resolve('openrouter', null)).toThrow(ProviderNotConfigured);

    await adapter.complete(chat(model));
    expect(fake.requests[0]!.body.model).toBe('llama3.2');
    expect(fake.requests[0]!.headers.authorization).toBeUndefined(); // no key, no bearer token
  });

  it('sends a project model override to the upstream', async () => {
    const { adapter, model } = providers({ AI_BASE_URL: fake.url, OPENAI_API_KEY: 'sk-openai' }).resolve('openai', 'gpt-4.1-nano');
    await adapter.complete(chat(model));
    expect(fake.requests[0]!.body.model).toBe('gpt-4.1-nano');
  });

  it('sends OpenRouter requests to AI_BASE_URL with its key and app attribution headers', async () => {
    const registry = providers({ AI_PROVIDER: 'openrouter', AI_BASE_URL: fake.url, OPENROUTER_API_KEY: 'sk-or-key' });
    const { adapter, model } = registry.resolve(null, null);
    expect(model).toBe('openai/gpt-4o-mini');
    await adapter.complete(chat(model));
    const { headers, body } = fake.requests[0]!;
    expect(headers.authorization).toBe('Bearer sk-or-key');
    expect(headers['http-referer']).toEqual(expect.any(String));
    expect(headers['x-title']).toBe('chatbot-platform');
    expect(body.model).toBe('openai/gpt-4o-mini');
  });

  it('sends OpenAI to OPENAI_BASE_URL with its key, keeping the Files API, and only with a key', async () => {
    const registry = providers({ OPENAI_API_KEY: 'sk-openai', OPENAI_BASE_URL: fake.url });
    const { adapter, model } = registry.resolve(null, null);
    expect(adapter.supportsFiles).toBe(true);
    await adapter.complete(chat(model));
    expect(fake.requests[0]).toMatchObject({ path: '/v1/chat/completions', headers: { authorization: 'Bearer sk-openai' } });
    expect(() => providers({ OPENAI_BASE_URL: fake.url }).resolve(null, null)).toThrow(ProviderNotConfigured);
  });

  it("bounds replies with max_completion_tokens at OpenAI's API, which its reasoning models need, and with max_tokens elsewhere", async () => {
    fake.setDefault({ asOpenAI: true });
    const openai = providers({ OPENAI_API_KEY: 'sk-openai', OPENAI_BASE_URL: fake.url }).resolve('openai', 'o4-mini');
    expect((await openai.adapter.complete(chat(openai.model))).content).toBe('Echo: Hi');
    const streamed: string[] = [];
    await openai.adapter.stream(chat(openai.model), (content) => {
      streamed.push(content);
    });
    expect(streamed.join('')).toBe('Echo: Hi');
    // A server behind AI_BASE_URL (Ollama, vLLM…) and OpenRouter know max_tokens.
    const others: Record<string, string>[] = [{ AI_BASE_URL: fake.url }, { AI_PROVIDER: 'openrouter', AI_BASE_URL: fake.url, OPENROUTER_API_KEY: 'sk-or' }];
    for (const env of others) {
      const { adapter, model } = providers(env).resolve(null, 'llama3.2');
      await adapter.complete(chat(model));
    }
    expect(fake.requests.map(({ body }) => [body.max_completion_tokens, body.max_tokens])).toEqual([
      [16, undefined],
      [16, undefined],
      [undefined, 16],
      [undefined, 16],
    ]);
  });

  it('passes AI_MAX_RETRIES to the adapters', async () => {
    fake.setDefault({ status: 503 });
    const { adapter, model } = providers({ AI_BASE_URL: fake.url, AI_MAX_RETRIES: '1' }).resolve(null, null);
    await expect(adapter.complete(chat(model))).rejects.toThrow();
    expect(fake.requests).toHaveLength(2);
  });
});

describe('default base URLs', () => {
  // Nothing here can reach the public APIs: the adapter tests show that requests go to the base URL an
  // adapter names, and these show which one it names.
  it.each([
    ['openai', { OPENAI_API_KEY: 'sk-openai' }, 'https://api.openai.com/v1'],
    ['openrouter', { OPENROUTER_API_KEY: 'sk-or' }, 'https://openrouter.ai/api/v1'],
  ] as const)('sends %s requests to its public API', (provider, env, url) => {
    expect(providers(env).resolve(provider, null).adapter).toMatchObject({ baseURL: url });
  });

  it('does not send OPENAI_ORG_ID or OPENAI_PROJECT_ID from the environment to a provider', async () => {
    vi.stubEnv('OPENAI_ORG_ID', 'org-LEAK');
    vi.stubEnv('OPENAI_PROJECT_ID', 'proj-LEAK');
    try {
      const { adapter, model } = providers({ OPENAI_API_KEY: 'sk-openai', OPENAI_BASE_URL: fake.url }).resolve('openai', null);
      await adapter.complete(chat(model));
    } finally {
      vi.unstubAllEnvs();
    }
    expect(fake.requests).toHaveLength(1);
    expect(JSON.stringify(fake.requests[0]!.headers)).not.toMatch(/LEAK/);
  });
});

describe('close', () => {
  it('closes every provider\'s connections, idle keep-alive ones included, where they would otherwise stay open', async () => {
    // A fake of its own: the other tests' registries keep their connections to theirs.
    const own = await FakeUpstream.start();
    try {
      const registry = providers({ AI_BASE_URL: own.url, OPENROUTER_API_KEY: 'sk-or' });
      await registry.resolve(null, 'gpt-4o-mini').adapter.complete(chat('gpt-4o-mini'));
      await expect(own.waitForNoConnections(300)).rejects.toThrow(/connections closed/);
      await registry.close();
      await own.waitForNoConnections(1_000);
    } finally {
      await own.close();
    }
  });
});
