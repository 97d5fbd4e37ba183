/**
 * What stops a start or `npm run db:migrate` for a reason of the environment (a variable, the database
 * out of reach or in use, migrations it refused), whose message says it in one line: both print the
 * message alone, without a stack.
 */
export class StartupError extends Error {}
