ALTER TABLE "messages" ADD COLUMN "tokens" integer;--> statement-breakpoint
ALTER TABLE "messages" ADD COLUMN "token_encoding" text;