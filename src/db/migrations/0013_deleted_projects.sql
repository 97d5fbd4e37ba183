-- Projects deleted lately, written by the delete's own transaction whatever deleted them (the project,
-- its account's cascade), so that the start's sweep of stray bytes removes the bytes of a deleted
-- project that a crash left before their removal, and still none of a project it knows nothing of
-- (the folder may be another database's). The sweep prunes the rows (FilesService.removeStrayBytes).
-- IF NOT EXISTS and OR REPLACE: runs again after a restore of a backup taken before it.
CREATE TABLE IF NOT EXISTS "deleted_projects" (
	"id" uuid PRIMARY KEY NOT NULL,
	"deleted_at" timestamp with time zone DEFAULT now() NOT NULL
);--> statement-breakpoint
CREATE OR REPLACE FUNCTION "remember_deleted_projects"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO "deleted_projects" ("id") SELECT "id" FROM "deleted_project_rows" ON CONFLICT ("id") DO NOTHING;
  RETURN NULL;
END $$;--> statement-breakpoint
CREATE OR REPLACE TRIGGER "projects_remember_deleted" AFTER DELETE ON "projects"
  REFERENCING OLD TABLE AS "deleted_project_rows" FOR EACH STATEMENT EXECUTE FUNCTION "remember_deleted_projects"();
