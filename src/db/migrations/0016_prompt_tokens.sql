-- A prompt's token count, stored by the first turn that counts its content, so that a later turn refuses
-- prompts that cannot fit its budget without reading them. Null until then, and again whenever the
-- content changes, however it is changed (an instance of before this migration during a rolling
-- deploy, an edit by hand): a count that outlived its content would refuse, or pass, the wrong turns.
-- IF NOT EXISTS and OR REPLACE: runs again after a restore of a backup taken before it.
ALTER TABLE "prompts" ADD COLUMN IF NOT EXISTS "tokens" integer;--> statement-breakpoint
ALTER TABLE "prompts" ADD COLUMN IF NOT EXISTS "token_encoding" text;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "forget_prompt_tokens"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW."tokens" := NULL;
  NEW."token_encoding" := NULL;
  RETURN NEW;
END $$;--> statement-breakpoint
CREATE OR REPLACE TRIGGER "prompts_forget_tokens" BEFORE UPDATE OF "content" ON "prompts"
  FOR EACH ROW WHEN (OLD."content" IS DISTINCT FROM NEW."content") EXECUTE FUNCTION "forget_prompt_tokens"();
