// `npm run db:migrate`: applies the committed SQL migrations and exits, for deploy pipelines that
// migrate before rolling out new instances. The service also applies them at start.
import { ConfigError, loadEnvironment } from '../config.js';
import { DatabaseUnreachableError, MigrationError, openDatabase } from './database.js';

try {
  const config = loadEnvironment();
  const database = await openDatabase(config);
  try {
    await database.migrate();
    process.stdout.write(`migrations applied (${database.kind})\n`);
  } finally {
    await database.close();
  }
} catch (error) {
  // What is wrong in one line: the configuration, the database out of reach, or what it said to the migrations.
  const known = error instanceof ConfigError || error instanceof DatabaseUnreachableError || error instanceof MigrationError;
  process.stderr.write(`${known ? error.message : String(error)}\n`);
  process.exit(1);
}
