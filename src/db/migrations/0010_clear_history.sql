-- Clears a project's history in one round trip, where the service made five (the ownership check, BEGIN,
-- the lock, the delete, COMMIT): false, deleting nothing, when the project is not the owner's. The delete
-- is a statement of its own after the lock is taken, so that in a function (VOLATILE, each statement
-- with a snapshot of its own) it sees every message committed before the lock was granted: every message
-- stored before the clear goes, and the answer of a turn whose question it deletes is not stored after
-- (`message_kept`, migration 0008). The ownership condition stays in the delete, as in every query of a
-- project's rows.
CREATE OR REPLACE FUNCTION "clear_project_messages"("project" uuid, "owner" uuid) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM "projects" WHERE "id" = "project" AND "user_id" = "owner") THEN
    RETURN false;
  END IF;
  PERFORM "lock_project_messages"("project");
  DELETE FROM "messages" WHERE "project_id" = "project"
    AND EXISTS (SELECT 1 FROM "projects" WHERE "id" = "project" AND "user_id" = "owner");
  RETURN true;
END $$;
