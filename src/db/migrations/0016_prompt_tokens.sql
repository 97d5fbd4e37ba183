-- A prompt's token count, stored by the first turn that counts its content, so that a later turn refuses
-- prompts that cannot fit its budget without reading them. Null until then.
-- IF NOT EXISTS: runs again after a restore of a backup taken before it.
ALTER TABLE "prompts" ADD COLUMN IF NOT EXISTS "tokens" integer;--> statement-breakpoint
ALTER TABLE "prompts" ADD COLUMN IF NOT EXISTS "token_encoding" text;
