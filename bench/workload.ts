/**
 * What every benchmarked chat asks and what the fake upstream answers. The seeded history is made of
 * the same two texts, so a project's history has messages of one size however it was written.
 */
export const CHAT_MESSAGE = 'What is the boiling point of water at sea level, in degrees Celsius?';
export const UPSTREAM_REPLY = 'Water boils at 100 degrees Celsius at sea level, and a little lower on a mountain.';

/** How the fake upstream answers every chat completion until told otherwise. */
export interface UpstreamBehaviour {
  /** A wait before the answer (JSON) or before the first chunk (streaming). */
  delayMs: number;
  /** Streaming: content chunks, one word of the reply each, cycling through it. */
  chunks: number;
  /** Streaming: a pause before every content chunk but the first. */
  chunkGapMs: number;
}

export const ANSWER_AT_ONCE: UpstreamBehaviour = { delayMs: 0, chunks: 8, chunkGapMs: 0 };

/** The model every benchmarked chat uses: the server's default (no AI_MODEL is set). */
export const BENCH_MODEL = 'gpt-4o-mini';
