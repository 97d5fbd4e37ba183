const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * Whether a path id can name a row at all. Anything else is answered 404 before a query is made:
 * PostgreSQL would refuse it as a uuid (22P02) and that must never surface as a 500.
 */
export function isUuid(value: string): boolean {
  return UUID.test(value);
}
