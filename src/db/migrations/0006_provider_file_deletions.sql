-- Runs again, and must, after a restore of a backup taken before it: pg_restore --clean re-creates only
-- what the backup holds, and the copies queued since would be those of files the backup has again.
DROP TABLE IF EXISTS "provider_file_deletions";--> statement-breakpoint
CREATE TABLE "provider_file_deletions" (
	"provider_file_id" text PRIMARY KEY NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"due_at" timestamp with time zone DEFAULT now() NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE INDEX "provider_file_deletions_due_at_idx" ON "provider_file_deletions" USING btree ("due_at");--> statement-breakpoint
-- Every deletion of file rows queues their provider copies in its own transaction: a file's, its
-- project's (which deletes the project's file rows first), its account's, and any cascade.
CREATE OR REPLACE FUNCTION "queue_provider_file_deletions"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO "provider_file_deletions" ("provider_file_id")
    SELECT "provider_file_id" FROM "deleted_files" WHERE "provider_file_id" IS NOT NULL
    ON CONFLICT DO NOTHING;
  RETURN NULL;
END $$;--> statement-breakpoint
CREATE OR REPLACE TRIGGER "files_queue_provider_file_deletions" AFTER DELETE ON "files"
  REFERENCING OLD TABLE AS "deleted_files" FOR EACH STATEMENT EXECUTE FUNCTION "queue_provider_file_deletions"();
