-- A question keeps its turn's Idempotency-Key, so that a retry with the key after a failed attempt (a
-- dropped or broken stream, which leaves the question and a cut-off answer) can mark the attempt's
-- question failed: the model is then sent the question once. An instance of before this stores no key
-- and reads none, and its retries are new turns as they were. The index holds keyed questions only.
-- A project's history revision counts the changes to its stored messages other than new ones (a question
-- marked failed, by its turn or by such a retry long after): what tells every instance that the history
-- it keeps in memory is out of date. Its default makes the column without rewriting the table.
-- IF NOT EXISTS: runs again after a restore of a backup taken before it.
ALTER TABLE "messages" ADD COLUMN IF NOT EXISTS "idempotency_key" text;--> statement-breakpoint
ALTER TABLE "projects" ADD COLUMN IF NOT EXISTS "history_revision" integer DEFAULT 0 NOT NULL;--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "messages_project_id_idempotency_key_idx" ON "messages" USING btree ("project_id","idempotency_key") WHERE "messages"."idempotency_key" is not null;
