import { performance } from 'node:perf_hooks';
import { ApiError, ShuttingDown } from '../http/errors.js';
import type { ProviderCall } from '../http/metrics.js';
import { providerFailureReason } from './openai-compatible.js';
import type { ProviderRegistry } from './registry.js';
import { type ChatCompletion, type ChatRequest, type DeltaSink, EmptyAnswer, type ProviderAdapter, type ProviderName, type ReplyEnd, type Usage } from './types.js';

type RecordCall = (call: ProviderCall) => void;

/** The same providers, with every chat call's duration, tokens and failure reported to `record`. */
export function meterProviders(providers: ProviderRegistry, record: RecordCall): ProviderRegistry {
  const metered = new Map<ProviderAdapter, ProviderAdapter>();
  const wrap = (adapter: ProviderAdapter) => {
    let wrapped = metered.get(adapter);
    if (!wrapped) {
      wrapped = new MeteredAdapter(adapter, record);
      metered.set(adapter, wrapped);
    }
    return wrapped;
  };
  return {
    resolve(projectProvider, projectModel) {
      const resolved = providers.resolve(projectProvider, projectModel);
      return { ...resolved, adapter: wrap(resolved.adapter) };
    },
    get(provider) {
      const adapter = providers.get(provider);
      return adapter && wrap(adapter);
    },
    defaultModel: providers.defaultModel,
    close: () => providers.close(),
  };
}

class MeteredAdapter implements ProviderAdapter {
  readonly name: ProviderName;
  readonly supportsFiles: boolean;
  // File calls have no model and report no tokens: they pass through as they are.
  readonly uploadFile?: ProviderAdapter['uploadFile'];
  readonly deleteFile?: ProviderAdapter['deleteFile'];

  constructor(
    private readonly inner: ProviderAdapter,
    private readonly record: RecordCall,
  ) {
    this.name = inner.name;
    this.supportsFiles = inner.supportsFiles;
    this.uploadFile = inner.uploadFile?.bind(inner);
    this.deleteFile = inner.deleteFile?.bind(inner);
  }

  complete(request: ChatRequest): Promise<ChatCompletion> {
    return this.metered(request, 'complete', () => this.inner.complete(request));
  }

  /** A stream whose client left counts as aborted (its signal ended the call), unless its text was over by then: a whole reply, `ok`. */
  stream(request: ChatRequest, onDelta: DeltaSink): Promise<ReplyEnd> {
    return this.metered(request, 'stream', () => this.inner.stream(request, onDelta));
  }

  private async metered<T extends { usage: Usage | null }>(request: ChatRequest, operation: ProviderCall['operation'], call: () => Promise<T>): Promise<T> {
    const started = performance.now();
    try {
      const answer = await call();
      this.report(request, operation, started, 'ok', answer.usage);
      return answer;
    } catch (error) {
      // Adapters throw provider errors (ApiError), or the abort reason when the call was given up: the
      // client gone, or the server shutting down (its interrupt, an ApiError too, is no failure of the provider's).
      const failed = error instanceof ApiError && !(error instanceof ShuttingDown);
      const outcome = failed ? { code: error.code, reason: providerFailureReason(error) } : 'aborted';
      this.report(request, operation, started, outcome, error instanceof EmptyAnswer ? error.usage : null);
      throw error;
    }
  }

  private report(request: ChatRequest, operation: ProviderCall['operation'], started: number, outcome: ProviderCall['outcome'], usage: Usage | null): void {
    const seconds = (performance.now() - started) / 1000;
    this.record({ provider: this.name, model: request.model, operation, seconds, outcome, usage });
  }
}
