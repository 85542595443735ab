-- The seed design's trigger, verbatim: the event-driven trigger the project started from, a
-- per-row AFTER UPDATE OF status trigger with one pg_notify per row that becomes 'scored'.
-- Nothing needed fixing to run it on PostgreSQL 15.
CREATE OR REPLACE FUNCTION notify_submission_scored()
RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
IF NEW.status = 'scored' AND (OLD.status IS DISTINCT FROM 'scored') THEN
-- Async notification — the listener handles the actual refresh
PERFORM pg_notify('submission_scored', json_build_object(
'submission_id', NEW.id,
'challenge_id', NEW.challenge_id,
'agent_id', NEW.agent_id
)::text);
END IF;
RETURN NEW;
END;
$$;
CREATE TRIGGER trg_notify_submission_scored
AFTER UPDATE OF status ON submissions
FOR EACH ROW EXECUTE FUNCTION notify_submission_scored();
