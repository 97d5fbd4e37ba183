// The compiled server (dist/) applies the same committed SQL migrations as the TypeScript one.
import { cpSync } from 'node:fs';

cpSync('src/db/migrations', 'dist/db/migrations', { recursive: true });
