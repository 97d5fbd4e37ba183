-- The ids of rows created under a parent row (a user's projects, a project's prompts), made by
-- the create's statement once it holds the parent's lock (see count-limit.ts): lists page by id, and an
-- id taken before that wait could be older than those of creates that got the lock first and committed,
-- behind a cursor already past them. Made after the lock, ids under one parent follow their commits.
-- OR REPLACE: runs again after a restore of a backup taken before it, which leaves them in place.
--
-- A UUID version 7 (RFC 9562) greater than `after` (a v7 id, or null): the database clock's millisecond
-- and 74 random bits, or, when the clock has not passed `after`'s millisecond (two creates in one, or a
-- clock set back), `after`'s millisecond and 12-bit counter plus one (carried into the millisecond), and
-- 62 random bits. The random bits are those of gen_random_uuid(), drawn from a strong source.
CREATE OR REPLACE FUNCTION "uuidv7_after"("after" uuid) RETURNS uuid LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  now_ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
  after_hex text := replace("after"::text, '-', '');
  after_ms bigint := ('x' || substr(after_hex, 1, 12))::bit(48)::bigint;
  counter integer := ('x' || substr(after_hex, 14, 3))::bit(12)::integer + 1;
  random_hex text := replace(gen_random_uuid()::text, '-', '');
BEGIN
  IF "after" IS NULL OR now_ms > after_ms THEN
    RETURN (lpad(to_hex(now_ms), 12, '0') || '7' || substr(random_hex, 14))::uuid;
  END IF;
  RETURN (lpad(to_hex(after_ms + counter / 4096), 12, '0') || '7' || lpad(to_hex(counter % 4096), 3, '0') || substr(random_hex, 17))::uuid;
END $$;--> statement-breakpoint
-- The next id under a parent: after its newest row's. VOLATILE, as the counters of migration 0005, for
-- a snapshot of its own, taken after the lock: it sees the rows of the creates that held it before.
CREATE OR REPLACE FUNCTION "new_project_id"(uuid) RETURNS uuid LANGUAGE sql VOLATILE AS $$ SELECT "uuidv7_after"((SELECT "id" FROM "projects" WHERE "user_id" = $1 ORDER BY "id" DESC LIMIT 1)) $$;--> statement-breakpoint
CREATE OR REPLACE FUNCTION "new_prompt_id"(uuid) RETURNS uuid LANGUAGE sql VOLATILE AS $$ SELECT "uuidv7_after"((SELECT "id" FROM "prompts" WHERE "project_id" = $1 ORDER BY "id" DESC LIMIT 1)) $$;
