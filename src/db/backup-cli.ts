// `npm run db:backup -- <folder>` and `npm run db:restore -- <folder>`; from the compiled code (the
// container has no tsx): `node dist/db/backup-cli.js backup|restore <folder>`.
import { ConfigError, loadEnvironment } from '../config.js';
import { BackupError, createBackup, restoreBackup } from './backup.js';

const [command, folder] = process.argv.slice(2);

try {
  if ((command !== 'backup' && command !== 'restore') || !folder) {
    throw new BackupError('Usage: npm run db:backup -- <folder> | npm run db:restore -- <folder>');
  }
  const config = loadEnvironment();
  if (command === 'backup') {
    const manifest = await createBackup(config, folder);
    process.stdout.write(`backup of the ${manifest.kind} database and the uploaded files written to ${folder}\n`);
    const { missingFiles: missing = [] } = manifest;
    if (missing.length > 0) {
      process.stderr.write(`warning: ${missing.length} of the uploaded files the database names were not under DATA_DIR/files, and are not in the backup (${missing[0]}…)\n`);
    }
  } else {
    const manifest = await restoreBackup(config, folder);
    process.stdout.write(`restored the ${manifest.kind} database and the uploaded files of ${manifest.createdAt} from ${folder}\n`);
  }
} catch (error) {
  const known = error instanceof ConfigError || error instanceof BackupError;
  process.stderr.write(`${known ? error.message : String(error)}\n`);
  process.exit(1);
}
