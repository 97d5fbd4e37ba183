-- An answer names its question, so that a context pairs each answer with its own question when turns
-- of one project ran at once (Q1, Q2, A1, A2 in the order stored). Answers stored before this keep a
-- null, each taken for an answer to the message stored before it, as they were.
-- IF NOT EXISTS: runs again after a restore of a backup taken before it.
ALTER TABLE "messages" ADD COLUMN IF NOT EXISTS "reply_to" uuid;
