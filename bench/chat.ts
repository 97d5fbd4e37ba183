import type { Bench, SignedIn } from './environment.js';
import { HttpClient, OPENAI_CHUNKS, OUR_EVENTS, type StreamTiming, type TimedResponse } from './http-client.js';
import { CHAT_MESSAGE } from './workload.js';

export const chatPath = (projectId: string) => `/api/v1/projects/${projectId}/chat`;
export const UPSTREAM_PATH = '/v1/chat/completions';

export function chatBody(stream: boolean): string {
  return JSON.stringify(stream ? { message: CHAT_MESSAGE, stream: true } : { message: CHAT_MESSAGE });
}

export function expectOk(response: TimedResponse, what: string): TimedResponse {
  if (response.status < 200 || response.status > 299) throw new Error(`${what}: ${response.status} ${response.body.slice(0, 300)}`);
  return response;
}

/** A stream that did not carry every delta to its end is an error, not a sample. */
export function expectWhole(timing: StreamTiming, deltas: number, what: string): StreamTiming {
  if (timing.error || !timing.done || timing.deltaMs.length !== deltas) {
    throw new Error(`${what}: ${timing.error ?? `${timing.deltaMs.length} of ${deltas} deltas, done: ${timing.done}`}`);
  }
  return timing;
}

/** One JSON chat through the service; its time in ms. */
export async function chatOnce(service: SignedIn, projectId: string): Promise<number> {
  return expectOk(await service.client.request('POST', chatPath(projectId), chatBody(false)), 'chat').ms;
}

export function streamOnce(service: SignedIn, projectId: string): Promise<StreamTiming> {
  return service.client.stream(chatPath(projectId), chatBody(true), OUR_EVENTS);
}

export async function clearHistory(service: SignedIn, projectId: string): Promise<void> {
  expectOk(await service.client.request('DELETE', `/api/v1/projects/${projectId}/messages`), 'clear history');
}

/** The body of the upstream request that `chat` makes the service send. */
export async function upstreamBodyOf(bench: Bench, chat: () => Promise<unknown>): Promise<string> {
  await chat();
  return bench.fake.lastChat();
}

/**
 * Chat completions on an OpenAI-compatible server (the fake upstream itself, or the gateway in front
 * of it), sent the body the service sent upstream, so that every side asks the same.
 */
export class UpstreamClient {
  private readonly client: HttpClient;

  constructor(origin: string, headers: Record<string, string> = {}) {
    this.client = new HttpClient(origin, headers);
  }

  async complete(body: string): Promise<number> {
    return expectOk(await this.client.request('POST', UPSTREAM_PATH, body), `${this.client.origin}${UPSTREAM_PATH}`).ms;
  }

  stream(body: string): Promise<StreamTiming> {
    return this.client.stream(UPSTREAM_PATH, body, OPENAI_CHUNKS);
  }

  close(): void {
    this.client.close();
  }
}
