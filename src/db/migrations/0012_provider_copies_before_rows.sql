-- A provider copy is queued for deletion as soon as it is made, due a day later, before the row that
-- names it is written: an upload whose row is never written (a crash, the database lost with the insert
-- in flight) leaves a copy that is deleted then. A queued copy that a row names is no longer deleted but
-- dropped from the queue (ProviderCopies), found by this index. A file deleted while its copy waits so
-- makes it due at once.
-- IF NOT EXISTS and OR REPLACE: runs again after a restore of a backup taken before it, and after 0006.
CREATE INDEX IF NOT EXISTS "files_provider_file_id_idx" ON "files" USING btree ("provider_file_id") WHERE "files"."provider_file_id" is not null;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "queue_provider_file_deletions"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO "provider_file_deletions" ("provider_file_id")
    SELECT "provider_file_id" FROM "deleted_files" WHERE "provider_file_id" IS NOT NULL
    ON CONFLICT ("provider_file_id") DO UPDATE SET "due_at" = least("provider_file_deletions"."due_at", excluded."due_at");
  RETURN NULL;
END $$;
