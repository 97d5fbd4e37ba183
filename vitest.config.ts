import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/support/temporary-root.ts'],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Each file opens its own throwaway database; two at a time fit two cores.
    maxWorkers: 2,
  },
});
