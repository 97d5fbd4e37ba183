/**
 * Token counts of texts that do not change under their key, by key and encoding, from the turns before.
 * Counting a long text is most of a turn's work otherwise, on the event loop, every turn (a 300 KB file:
 * 50 ms; a project's long prompts: seconds). The oldest counts go past `maxEntries`.
 */
export class TokenCounts<T> {
  private readonly counts = new Map<string, T>();

  constructor(private readonly maxEntries = 10_000) {}

  get(key: string, encoding: string): T | undefined {
    return this.counts.get(`${key} ${encoding}`);
  }

  set(key: string, encoding: string, count: T): void {
    const entry = `${key} ${encoding}`;
    this.counts.delete(entry);
    this.counts.set(entry, count);
    if (this.counts.size > this.maxEntries) this.counts.delete(this.counts.keys().next().value!);
  }
}
