-- A keyed turn's result kept for replay holds its question and its answer whole, for 24 hours: it goes
-- with its project, deleted with it (the foreign key), and with the project's history when that is
-- cleared (`clear_project_messages`), as the messages themselves do. Before, a cleared history or a
-- deleted project left that text stored, and a retry of the key was answered with it.
-- The keys kept before this: a finished one whose question is gone (its history cleared, its project
-- deleted) is deleted; the others take the project of their question. A running one holds no text
-- yet and is left as it is, as is a key that an instance of the code before this claims during a
-- rolling deploy: finished without a project, such a key goes by the project its result names (the
-- clear below, and the trigger on a project's deletion).
-- IF NOT EXISTS, OR REPLACE and the guarded constraint: runs again after a restore of a backup taken before it.
ALTER TABLE "idempotency_keys" ADD COLUMN IF NOT EXISTS "project_id" uuid;--> statement-breakpoint
DELETE FROM "idempotency_keys" AS k WHERE k."state" = 'done' AND k."project_id" IS NULL
  AND NOT EXISTS (SELECT 1 FROM "messages" AS m WHERE m."id" = (k."response"->'userMessage'->>'id')::uuid);--> statement-breakpoint
UPDATE "idempotency_keys" AS k SET "project_id" = m."project_id" FROM "messages" AS m
  WHERE k."state" = 'done' AND k."project_id" IS NULL AND m."id" = (k."response"->'userMessage'->>'id')::uuid;--> statement-breakpoint
DO $$ BEGIN
  ALTER TABLE "idempotency_keys" ADD CONSTRAINT "idempotency_keys_project_id_projects_id_fk" FOREIGN KEY ("project_id") REFERENCES "public"."projects"("id") ON DELETE cascade ON UPDATE no action;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "idempotency_keys_project_id_idx" ON "idempotency_keys" USING btree ("project_id");--> statement-breakpoint
-- As 0010's, and the project's finished keys deleted with its messages, under the same lock: a turn
-- whose question the clear deletes stores no answer and so keeps no result after it (`message_kept`).
CREATE OR REPLACE FUNCTION "clear_project_messages"("project" uuid, "owner" uuid) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM "projects" WHERE "id" = "project" AND "user_id" = "owner") THEN
    RETURN false;
  END IF;
  PERFORM "lock_project_messages"("project");
  DELETE FROM "messages" WHERE "project_id" = "project"
    AND EXISTS (SELECT 1 FROM "projects" WHERE "id" = "project" AND "user_id" = "owner");
  DELETE FROM "idempotency_keys" WHERE "user_id" = "owner" AND "state" = 'done' AND ("project_id" = "project"
    OR ("project_id" IS NULL AND "response"->'userMessage'->>'projectId' = "project"::text));
  RETURN true;
END $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "forget_idempotency_keys_of_deleted_projects"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM "idempotency_keys" AS k USING "deleted_project_rows" AS p
    WHERE k."user_id" = p."user_id" AND k."project_id" IS NULL AND k."state" = 'done'
      AND k."response"->'userMessage'->>'projectId' = p."id"::text;
  RETURN NULL;
END $$;--> statement-breakpoint
CREATE OR REPLACE TRIGGER "projects_forget_idempotency_keys" AFTER DELETE ON "projects"
  REFERENCING OLD TABLE AS "deleted_project_rows" FOR EACH STATEMENT EXECUTE FUNCTION "forget_idempotency_keys_of_deleted_projects"();
