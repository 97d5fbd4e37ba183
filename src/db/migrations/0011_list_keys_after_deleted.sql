-- A row's list key (migrations 0007 and 0009) was made after the newest row still under its parent.
-- With that row deleted, it came from the clock alone, which may be behind the deleted row's key (a
-- clock set back; for an id, a create in the deleted row's millisecond), and a client whose walk of the
-- list had reached the deleted row never saw the new one. Each parent now keeps the newest key made
-- under it, written by the create's statement that holds its lock (count-limit.ts), and a new key comes
-- after that too. Not messages: writing the project's row for every message is what 0008 avoids.
-- IF NOT EXISTS and OR REPLACE: runs again after a restore of a backup taken before it.
ALTER TABLE "projects" ADD COLUMN IF NOT EXISTS "newest_prompt_id" uuid;--> statement-breakpoint
ALTER TABLE "projects" ADD COLUMN IF NOT EXISTS "newest_file_created_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "users" ADD COLUMN IF NOT EXISTS "newest_project_id" uuid;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "new_project_id"(uuid) RETURNS uuid LANGUAGE sql VOLATILE AS $$ SELECT "uuidv7_after"(greatest((SELECT "id" FROM "projects" WHERE "user_id" = $1 ORDER BY "id" DESC LIMIT 1), (SELECT "newest_project_id" FROM "users" WHERE "id" = $1))) $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "new_prompt_id"(uuid) RETURNS uuid LANGUAGE sql VOLATILE AS $$ SELECT "uuidv7_after"(greatest((SELECT "id" FROM "prompts" WHERE "project_id" = $1 ORDER BY "id" DESC LIMIT 1), (SELECT "newest_prompt_id" FROM "projects" WHERE "id" = $1))) $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "new_file_created_at"(uuid) RETURNS timestamptz LANGUAGE sql VOLATILE AS $$ SELECT "stamp_after"(greatest((SELECT max("created_at") FROM "files" WHERE "project_id" = $1), (SELECT "newest_file_created_at" FROM "projects" WHERE "id" = $1))) $$;
