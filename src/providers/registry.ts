import type { Config } from '../config.js';
import { maxResponseBytesFor, OpenAICompatibleAdapter, type OutputLimitField } from './openai-compatible.js';
import { type ProviderAdapter, type ProviderName, ProviderNotConfigured, type RetryListener } from './types.js';

export type ProvidersConfig = Pick<
  Config,
  | 'AI_PROVIDER'
  | 'OPENAI_API_KEY'
  | 'OPENROUTER_API_KEY'
  | 'AI_BASE_URL'
  | 'OPENAI_BASE_URL'
  | 'AI_MODEL'
  | 'AI_MAX_RETRIES'
  | 'AI_MAX_OUTPUT_TOKENS'
>;

interface ProviderDefaults {
  baseURL(config: ProvidersConfig): string;
  /** The model when neither the project nor AI_MODEL names one. */
  model: string;
  apiKey(config: ProvidersConfig): string | undefined;
  headers?: Record<string, string>;
  hasFilesApi: boolean;
  /** The field that bounds a reply, at the provider's own API (another server behind AI_BASE_URL gets `max_tokens`). */
  outputLimitField?: OutputLimitField;
}

const PROVIDER_DEFAULTS: Record<ProviderName, ProviderDefaults> = {
  openai: {
    // OPENAI_BASE_URL: OpenAI's own API at another address (a gateway, a proxy, a test double), so
    // unlike AI_BASE_URL it keeps what only OpenAI has, the Files API.
    baseURL: (config) => config.OPENAI_BASE_URL ?? 'https://api.openai.com/v1',
    model: 'gpt-4o-mini',
    apiKey: (config) => config.OPENAI_API_KEY,
    hasFilesApi: true,
    // Its reasoning models refuse max_tokens.
    outputLimitField: 'max_completion_tokens',
  },
  openrouter: {
    baseURL: () => 'https://openrouter.ai/api/v1',
    model: 'openai/gpt-4o-mini',
    apiKey: (config) => config.OPENROUTER_API_KEY,
    // App attribution (https://openrouter.ai/docs/app-attribution). The server has no public URL of its
    // own to give, and OpenRouter tracks a localhost app by its title.
    headers: { 'HTTP-Referer': 'http://localhost', 'X-Title': 'chatbot-platform' },
    hasFilesApi: false,
  },
};

export interface ResolvedProvider {
  adapter: ProviderAdapter;
  model: string;
}

export interface ProviderRegistry {
  /**
   * The adapter and model for one chat: the project's own provider and model when set, else the
   * server's (AI_PROVIDER, AI_MODEL). Read per request, so a project's change needs no restart.
   * Throws ProviderNotConfigured when that provider has neither a key nor a base URL.
   */
  resolve(projectProvider: ProviderName | null, projectModel: string | null): ResolvedProvider;
  /** The model of a project that names neither provider nor model; undefined when its provider is not configured. */
  readonly defaultModel: string | undefined;
  /** A provider's adapter when it is configured: file calls go to the provider that holds the file. */
  get(provider: ProviderName): ProviderAdapter | undefined;
  /** Closes every provider's connections once its calls in flight are done; for the app's close. */
  close(): Promise<void>;
}

/** One adapter (one connection pool) per configured provider, for the process's life. */
export function createProviders(config: ProvidersConfig, onRetry?: RetryListener): ProviderRegistry {
  const adapters = new Map<ProviderName, OpenAICompatibleAdapter>();
  for (const name of Object.keys(PROVIDER_DEFAULTS) as ProviderName[]) {
    const adapter = createAdapter(name, config, onRetry);
    if (adapter) adapters.set(name, adapter);
  }
  // AI_MODEL names a model of the default provider; another provider would not know it.
  const modelOf = (name: ProviderName, projectModel: string | null) => projectModel ?? (name === config.AI_PROVIDER ? defaultModelOf(config) : PROVIDER_DEFAULTS[name].model);
  return {
    resolve(projectProvider, projectModel) {
      const name = projectProvider ?? config.AI_PROVIDER;
      const adapter = adapters.get(name);
      if (!adapter) throw new ProviderNotConfigured(name);
      return { adapter, model: modelOf(name, projectModel) };
    },
    defaultModel: adapters.has(config.AI_PROVIDER) ? modelOf(config.AI_PROVIDER, null) : undefined,
    get: (provider) => adapters.get(provider),
    close: async () => {
      await Promise.all([...adapters.values()].map((adapter) => adapter.close()));
    },
  };
}

/** The provider's adapter, or undefined when it is not configured: no key, and no AI_BASE_URL for it. */
function createAdapter(name: ProviderName, config: ProvidersConfig, onRetry?: RetryListener): OpenAICompatibleAdapter | undefined {
  const defaults = PROVIDER_DEFAULTS[name];
  const apiKey = defaults.apiKey(config);
  // AI_BASE_URL moves the default provider to another server speaking its protocol (Ollama, vLLM, llama.cpp).
  const baseURL = name === config.AI_PROVIDER ? config.AI_BASE_URL : undefined;
  if (!apiKey && !baseURL) return undefined;
  return new OpenAICompatibleAdapter({
    name,
    apiKey,
    baseURL: baseURL ?? defaults.baseURL(config),
    defaultHeaders: defaults.headers,
    // Another server behind the same protocol has no Files API to count on.
    supportsFiles: defaults.hasFilesApi && !baseURL,
    ...(!baseURL && defaults.outputLimitField && { outputLimitField: defaults.outputLimitField }),
    maxRetries: config.AI_MAX_RETRIES,
    onRetry,
    maxResponseBytes: maxResponseBytesFor(config.AI_MAX_OUTPUT_TOKENS),
  });
}

/** The model of a project that names neither provider nor model: AI_MODEL, else its provider's default. */
export function defaultModelOf(config: Pick<ProvidersConfig, 'AI_PROVIDER' | 'AI_MODEL'>): string {
  return config.AI_MODEL ?? PROVIDER_DEFAULTS[config.AI_PROVIDER].model;
}
