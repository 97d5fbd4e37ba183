// What the compiled server (dist/) needs beside the JavaScript tsc emits: the same committed SQL
// migrations as the TypeScript one, and the password hashing thread's script, which is plain
// JavaScript (tsc compiles only .ts) so that it loads without a TypeScript loader under tsx and vitest too.
import { cpSync } from 'node:fs';

cpSync('src/db/migrations', 'dist/db/migrations', { recursive: true });
cpSync('src/modules/auth/password-hasher-worker.mjs', 'dist/modules/auth/password-hasher-worker.mjs');
