/** Whether the error, or one of its causes (drizzle wraps driver errors), carries the PostgreSQL `code`. */
export function hasCode(error: unknown, code: string): boolean {
  for (let e = error, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    if ((e as { code?: unknown }).code === code) return true;
  }
  return false;
}
