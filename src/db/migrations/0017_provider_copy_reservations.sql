-- A provider copy is queued for deletion a day after it is made, in case the file row that names it is
-- never written (`ProviderCopies.reserve`); this takes it out of the queue in the insert that writes the
-- row, whoever writes it. Left there until this code's sweep saw the row, it was deleted upstream by the
-- sweep of an instance of before the reservations (a rolling deploy, a rollback), which does not look for
-- a row: a live file lost its copy, and every chat of its project failed upstream.
-- OR REPLACE: runs again after a restore of a backup taken before it.
-- A reservation only: not yet tried, and due later. A deleted file's copy is queued due at once, and
-- pushed later only by a try, which counts.
CREATE OR REPLACE FUNCTION "provider_copy_named"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM "provider_file_deletions"
    WHERE "provider_file_id" = NEW."provider_file_id" AND "attempts" = 0 AND "due_at" > now();
  RETURN NULL;
END $$;--> statement-breakpoint
CREATE OR REPLACE TRIGGER "files_provider_copy_named" AFTER INSERT ON "files"
  FOR EACH ROW WHEN (NEW."provider_file_id" IS NOT NULL) EXECUTE FUNCTION "provider_copy_named"();--> statement-breakpoint
-- And the reservations of copies that rows already name.
DELETE FROM "provider_file_deletions" d WHERE EXISTS (SELECT 1 FROM "files" f WHERE f."provider_file_id" = d."provider_file_id");
