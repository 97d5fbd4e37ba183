export interface SseEvent {
  id?: string;
  event: string;
  data: Record<string, unknown>;
}

/** Splits a text/event-stream body into events; comment lines (heartbeats) are counted, not returned. */
export function parseSse(text: string): { events: SseEvent[]; comments: number } {
  const events: SseEvent[] = [];
  let comments = 0;
  for (const block of text.split('\n\n')) {
    if (!block.trim()) continue;
    const event: Partial<SseEvent> & { dataLines: string[] } = { dataLines: [] };
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) comments++;
      else if (line.startsWith('id: ')) event.id = line.slice(4);
      else if (line.startsWith('event: ')) event.event = line.slice(7);
      else if (line.startsWith('data: ')) event.dataLines.push(line.slice(6));
    }
    if (event.event) events.push({ id: event.id, event: event.event, data: JSON.parse(event.dataLines.join('\n')) });
  }
  return { events, comments };
}

/**
 * Reads an SSE response as it arrives, calling `onEvent` for each event; resolves with all of them when
 * the stream ends. `onEvent` may return 'stop' to abort the request (a client that leaves).
 */
export async function readSse(
  response: Response,
  onEvent: (event: SseEvent) => void | 'stop' = () => {},
  controller?: AbortController,
): Promise<SseEvent[]> {
  const all: SseEvent[] = [];
  const decoder = new TextDecoder();
  let buffer = '';
  const reader = response.body!.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const end = buffer.lastIndexOf('\n\n');
      if (end < 0) continue;
      const { events } = parseSse(buffer.slice(0, end + 2));
      buffer = buffer.slice(end + 2);
      for (const event of events) {
        all.push(event);
        if (onEvent(event) === 'stop') {
          controller?.abort();
          return all;
        }
      }
    }
  } catch (error) {
    if (!controller?.signal.aborted) throw error;
  }
  return all;
}
