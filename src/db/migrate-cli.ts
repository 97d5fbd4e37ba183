// `npm run db:migrate`: applies the committed SQL migrations and exits, for deploy pipelines that
// migrate before rolling out new instances. The service also applies them at start.
import { loadEnvironment } from '../config.js';
import { StartupError } from '../startup-error.js';
import { openDatabase } from './database.js';

try {
  const config = loadEnvironment();
  const database = await openDatabase(config);
  try {
    await database.migrate((waiting) => process.stderr.write(`${waiting}\n`));
    process.stdout.write(`migrations applied (${database.kind})\n`);
  } finally {
    await database.close();
  }
} catch (error) {
  process.stderr.write(`${error instanceof StartupError ? error.message : String(error)}\n`);
  process.exit(1);
}
