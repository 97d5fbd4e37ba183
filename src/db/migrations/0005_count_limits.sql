-- What a create under a count limit counts (MAX_PROJECTS_PER_USER, MAX_PROMPTS_PER_PROJECT,
-- MAX_FILES_PER_PROJECT), called by the create's one statement once it holds the parent row's lock.
-- VOLATILE is what they are for: under READ COMMITTED a volatile function takes a fresh snapshot for
-- its query, which sees every row committed by a create that held the lock before; the create's own
-- statement took its snapshot before the lock was granted, and a count(*) in it would miss them.
-- OR REPLACE: runs again after a restore of a backup taken before it, which leaves them in place.
CREATE OR REPLACE FUNCTION "projects_of_user"(uuid) RETURNS bigint LANGUAGE sql VOLATILE AS $$ SELECT count(*) FROM "projects" WHERE "user_id" = $1 $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "prompts_of_project"(uuid) RETURNS bigint LANGUAGE sql VOLATILE AS $$ SELECT count(*) FROM "prompts" WHERE "project_id" = $1 $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "files_of_project"(uuid) RETURNS bigint LANGUAGE sql VOLATILE AS $$ SELECT count(*) FROM "files" WHERE "project_id" = $1 $$;
