-- Files are listed by (created_at, id), as messages are, and no longer by id: a file's id names its
-- bytes, stored before the row is written and before its create waits for the project's lock, so an id
-- could be older than those of uploads that got the lock first and committed, behind a cursor already
-- past them. Its time is stamped by the create's statement once it holds the lock (count-limit.ts),
-- later than the project's newest file: a project's files commit in the order they are listed in.
-- IF [NOT] EXISTS and OR REPLACE: runs again after a restore of a backup taken before it.
--
-- The index by id is dropped only if that takes no more than a second: dropping locks the table against
-- reads too, until the migrations commit, and behind a backup running meanwhile (it holds the table in
-- SHARE mode to the end) every chat turn would wait for the backup. Left in place, it is only unused.
DO $$
DECLARE
  waited text := current_setting('lock_timeout');
BEGIN
  PERFORM set_config('lock_timeout', '1s', true);
  DROP INDEX IF EXISTS "files_project_id_id_idx";
  PERFORM set_config('lock_timeout', waited, true);
EXCEPTION WHEN lock_not_available THEN
  RAISE NOTICE 'files_project_id_id_idx left in place: files were locked (a backup running?)';
END $$;--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "files_project_id_created_at_id_idx" ON "files" USING btree ("project_id","created_at","id");--> statement-breakpoint
-- VOLATILE, as the counters of migration 0005, for a snapshot of its own, taken after the lock: it sees
-- the files of the creates that held it before.
CREATE OR REPLACE FUNCTION "new_file_created_at"(uuid) RETURNS timestamptz LANGUAGE sql VOLATILE AS $$ SELECT "stamp_after"((SELECT max("created_at") FROM "files" WHERE "project_id" = $1)) $$;
