-- The time a message is stored at, for the statement that stores it in a project: lists page by
-- (created_at, id), and a message stamped before another but committed after it would land behind a
-- cursor already past the other, never to be listed to that walk. So the stamp is taken under a lock
-- of the project's messages that its transaction holds until it commits (messages of one project are
-- then committed in the order of their stamps), with a snapshot of its own taken after the lock
-- (VOLATILE: it sees the messages of every transaction that held the lock before), later than the
-- newest of them even if the clock was set back. An advisory lock, not the project row's: taking a row
-- lock writes the row, for every message. (1836279667, 'msgs' in ASCII, keeps these locks apart from
-- any other's; two projects whose ids hash alike only wait for each other.)
-- OR REPLACE: runs again after a restore of a backup taken before it, which leaves them in place.
CREATE OR REPLACE FUNCTION "lock_project_messages"("project" uuid) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(1836279667, hashtext("project"::text));
END $$;--> statement-breakpoint
-- A time later than `newest` (a row's, or null): the clock's, or, when the clock has not passed it (two
-- rows in one microsecond, or a clock set back), a microsecond after it. Files' too (migration 0009).
CREATE OR REPLACE FUNCTION "stamp_after"("newest" timestamptz) RETURNS timestamptz LANGUAGE sql VOLATILE AS $$ SELECT greatest(clock_timestamp(), $1 + interval '1 microsecond') $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "message_stamp"("project" uuid) RETURNS timestamptz LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  newest timestamptz;
BEGIN
  PERFORM "lock_project_messages"("project");
  SELECT max("created_at") INTO newest FROM "messages" WHERE "project_id" = "project";
  RETURN "stamp_after"(newest);
END $$;--> statement-breakpoint
-- Whether the message `question` is still stored, asked under the same lock (and with a snapshot taken
-- after it): an answer is stored only with its question. A clear of the history takes the lock before
-- it deletes, so an answer either lands before the clear (and goes with it) or sees its question gone.
CREATE OR REPLACE FUNCTION "message_kept"("project" uuid, "question" uuid) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM "lock_project_messages"("project");
  RETURN EXISTS (SELECT 1 FROM "messages" WHERE "id" = "question" AND "project_id" = "project");
END $$;
