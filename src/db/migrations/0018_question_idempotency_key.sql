-- A question keeps its turn's Idempotency-Key, so that a retry with the key after a failed attempt (a
-- dropped or broken stream, which leaves the question and a cut-off answer) can mark the attempt's
-- question failed: the model is then sent the question once. An instance of before this stores no key
-- and reads none, and its retries are new turns as they were. The index holds keyed questions only.
-- And the failed questions, which a turn counts as its history's revision: a question marked failed
-- deep in the history (by such a retry, by any instance) tells every instance that the history it
-- keeps in memory is out of date. Only `messages` is altered: the old instances serving meanwhile read
-- `projects` before it, and a migration that took both could deadlock with them.
-- IF NOT EXISTS: runs again after a restore of a backup taken before it.
ALTER TABLE "messages" ADD COLUMN IF NOT EXISTS "idempotency_key" text;--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "messages_project_id_idempotency_key_idx" ON "messages" USING btree ("project_id","idempotency_key") WHERE "messages"."idempotency_key" is not null;--> statement-breakpoint
CREATE INDEX IF NOT EXISTS "messages_project_id_failed_idx" ON "messages" USING btree ("project_id") WHERE "messages"."status" = 'failed';
