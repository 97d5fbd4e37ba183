import http, { type IncomingHttpHeaders } from 'node:http';
import { performance } from 'node:perf_hooks';

export interface TimedResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
  /** From the call to the last byte of the response. */
  ms: number;
}

export interface SseEvent {
  event: string;
  data: string;
}

/** How a stream says "here is some text" and "the answer is over". */
export interface StreamProtocol {
  isDelta(event: SseEvent): boolean;
  isDone(event: SseEvent): boolean;
}

/** Our API: `event: delta` … `event: done`. */
export const OUR_EVENTS: StreamProtocol = {
  isDelta: (event) => event.event === 'delta',
  isDone: (event) => event.event === 'done',
};

/** OpenAI's chunks, as the fake upstream and the gateway send them: text in `choices[0].delta.content`. */
export const OPENAI_CHUNKS: StreamProtocol = {
  isDelta(event) {
    if (event.data === '' || event.data === '[DONE]') return false;
    const chunk = JSON.parse(event.data) as { choices?: { delta?: { content?: string } }[] };
    return Boolean(chunk.choices?.[0]?.delta?.content);
  },
  isDone: (event) => event.data === '[DONE]',
};

export interface StreamTiming {
  status: number;
  /** performance.now() at the call. */
  startedAt: number;
  /** Times (ms since the call) at which the first event and each delta arrived, and the stream ended. */
  firstEventMs: number;
  deltaMs: number[];
  endMs: number;
  done: boolean;
  /** Set when the connection failed or the status was not 200. */
  error?: string;
}

/** When each stream's first delta arrived (ms since its call). */
export const firstDeltas = (timings: StreamTiming[]) => timings.map((timing) => timing.deltaMs[0]!);

/** Every pause between two deltas of one stream, all streams together. */
export const deltaGaps = (timings: StreamTiming[]) => timings.flatMap((timing) => timing.deltaMs.slice(1).map((at, i) => at - timing.deltaMs[i]!));

/**
 * The pauses between deltas longer than `overMs`: how many, in how many streams, at how many positions
 * (the first gap, the second…). A tail made by one step of every stream sits at one position; pauses of
 * the process or of the machine fall anywhere.
 */
export function lateGaps(timings: StreamTiming[], overMs: number): { gaps: number; streams: number; positions: number } {
  const late = timings.flatMap((timing, stream) =>
    timing.deltaMs.slice(1).flatMap((at, position) => (at - timing.deltaMs[position]! > overMs ? [{ stream, position }] : [])),
  );
  return { gaps: late.length, streams: new Set(late.map((gap) => gap.stream)).size, positions: new Set(late.map((gap) => gap.position)).size };
}

/**
 * An HTTP/1.1 client of one origin on node:http, as thin as a client gets, so that what it costs is
 * the same small amount for every server it times.
 */
export class HttpClient {
  private readonly agent: http.Agent;

  constructor(
    readonly origin: string,
    private readonly headers: Record<string, string> = {},
    /** Sequential timing reuses one kept-alive connection; many concurrent streams each open their own. */
    connections: { keepAlive: boolean; maxSockets: number } = { keepAlive: true, maxSockets: 1 },
  ) {
    this.agent = new http.Agent(connections);
  }

  request(method: string, path: string, body?: string): Promise<TimedResponse> {
    const started = performance.now();
    return new Promise((resolve, reject) => {
      const req = this.send(method, path, body, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, ms: performance.now() - started }));
        res.on('error', reject);
      });
      req.on('error', reject);
    });
  }

  /** A POST answered by server-sent events, timed event by event; never rejects. */
  stream(path: string, body: string, protocol: StreamProtocol, timeoutMs = 60_000): Promise<StreamTiming> {
    const started = performance.now();
    const timing: StreamTiming = { status: 0, startedAt: started, firstEventMs: Number.NaN, deltaMs: [], endMs: Number.NaN, done: false };
    return new Promise((resolve) => {
      const end = () => {
        timing.endMs = performance.now() - started;
        resolve(timing);
      };
      const fail = (error: string) => {
        timing.error ??= error;
        end();
      };
      const req = this.send('POST', path, body, (res) => {
        timing.status = res.statusCode ?? 0;
        if (timing.status !== 200) fail(`status ${timing.status}`);
        let pending = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          const at = performance.now() - started;
          pending += chunk;
          let end: number;
          while ((end = pending.indexOf('\n\n')) !== -1) {
            const event = parseEvent(pending.slice(0, end));
            pending = pending.slice(end + 2);
            if (Number.isNaN(timing.firstEventMs)) timing.firstEventMs = at;
            if (protocol.isDelta(event)) timing.deltaMs.push(at);
            else if (protocol.isDone(event)) timing.done = true;
          }
        });
        res.on('end', end);
        res.on('error', (error) => fail(error.message));
      });
      req.setTimeout(timeoutMs, () => req.destroy(new Error(`no byte for ${timeoutMs} ms`)));
      req.on('error', (error) => fail(error.message));
    });
  }

  close(): void {
    this.agent.destroy();
  }

  private send(method: string, path: string, body: string | undefined, onResponse: (res: http.IncomingMessage) => void) {
    const headers: Record<string, string | number> = { ...this.headers };
    if (body !== undefined) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = Buffer.byteLength(body);
    }
    const req = http.request(`${this.origin}${path}`, { method, headers, agent: this.agent }, onResponse);
    req.end(body);
    return req;
  }
}

function parseEvent(block: string): SseEvent {
  let event = '';
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) event = line.slice(6).trim();
    else if (line.startsWith('data:')) data += line.slice(5).trim();
  }
  return { event, data };
}
