import { performance } from 'node:perf_hooks';
import { ApiError } from '../http/errors.js';
import type { ProviderCall } from '../http/metrics.js';
import type { ProviderRegistry } from './registry.js';
import type { ChatCompletion, ChatRequest, ProviderAdapter, ProviderName, StreamEvent, Usage } from './types.js';

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

  async complete(request: ChatRequest): Promise<ChatCompletion> {
    const started = performance.now();
    try {
      const completion = await this.inner.complete(request);
      this.report(request, 'complete', started, 'ok', completion.usage);
      return completion;
    } catch (error) {
      this.report(request, 'complete', started, outcomeOf(error), null);
      throw error;
    }
  }

  async *stream(request: ChatRequest): AsyncGenerator<StreamEvent> {
    const started = performance.now();
    // Stays `aborted` when the consumer stops reading early (the client left) and the stream is closed under it.
    let outcome: ProviderCall['outcome'] = 'aborted';
    let usage: Usage | null = null;
    try {
      for await (const event of this.inner.stream(request)) {
        if (event.type === 'done') usage = event.usage;
        yield event;
      }
      outcome = 'ok';
    } catch (error) {
      outcome = outcomeOf(error);
      throw error;
    } finally {
      this.report(request, 'stream', started, outcome, usage);
    }
  }

  private report(request: ChatRequest, operation: ProviderCall['operation'], started: number, outcome: ProviderCall['outcome'], usage: Usage | null): void {
    const seconds = (performance.now() - started) / 1000;
    this.record({ provider: this.name, model: request.model, operation, seconds, outcome, usage });
  }
}

/** Adapters throw provider errors (ApiError), or the abort reason when the client left. */
function outcomeOf(error: unknown): ProviderCall['outcome'] {
  return error instanceof ApiError ? error.code : 'aborted';
}
