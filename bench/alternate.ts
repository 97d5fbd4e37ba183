export interface AlternateOptions {
  /** Rounds run first and thrown away: connections opened, code compiled, caches filled. */
  warmupRounds?: number;
  /** Runs before each round, untimed (e.g. clearing a history). */
  beforeRound?: () => Promise<unknown>;
}

/**
 * Runs every side once per round, rotating which goes first (A B, B A, …), so that a drift in the
 * machine's load, from other work on it or from the run itself, falls on every side alike.
 */
export async function alternate<T>(
  rounds: number,
  sides: Record<string, () => Promise<T>>,
  options: AlternateOptions = {},
): Promise<Record<string, T[]>> {
  const names = Object.keys(sides);
  const results: Record<string, T[]> = Object.fromEntries(names.map((name) => [name, []]));
  const warmup = options.warmupRounds ?? 0;
  for (let round = 0; round < warmup + rounds; round++) {
    await options.beforeRound?.();
    for (let i = 0; i < names.length; i++) {
      const name = names[(round + i) % names.length]!;
      const result = await sides[name]!();
      if (round >= warmup) results[name]!.push(result);
    }
  }
  return results;
}
