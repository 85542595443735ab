-- Removes everything `mvrefresh install` created, except the bundled analytics (see the end).
-- Run it in one transaction: psql -1 -v ON_ERROR_STOP=1 -f sql/uninstall.sql "$DATABASE_URL"
-- Stop every mvrefresh daemon first. pg_cron jobs registered with `install --pg-cron` are named
-- mvrefresh:<view>; those that run in this database are removed too when pg_cron is installed
-- in this database (jobs of other databases are left alone). When pg_cron lives in another
-- database (cron.database_name), remove them there:
--   SELECT cron.unschedule(jobid) FROM cron.job
--   WHERE jobname LIKE 'mvrefresh:%' AND database = '<this database>';

-- Capture triggers call mvrefresh.record_changes(): drop them before the schema, or writes to the
-- captured tables would fail.
DO $uninstall$
DECLARE
    t record;
    p record;
BEGIN
    FOR t IN
        SELECT tg.tgrelid::regclass AS rel, tg.tgname
        FROM pg_trigger tg
        -- (Not the partitions' clones of a partitioned table's trigger: they go with it.)
        WHERE NOT tg.tgisinternal AND tg.tgparentid = 0 AND tg.tgname LIKE 'mvrefresh\_capture\_%'
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    -- mvrefresh_capture (its functions live in schema mvrefresh; once its triggers on
    -- mvrefresh.dirty are gone, none is used any more).
    FOR t IN
        SELECT tg.tgrelid::regclass AS rel, tg.tgname
        FROM pg_trigger tg
        WHERE tg.tgrelid = to_regclass('mvrefresh.dirty') AND tg.tgname LIKE 'mvrefresh\_forget$%'
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    DROP EXTENSION IF EXISTS mvrefresh_capture;
    IF to_regprocedure('mvrefresh_capture_bout_results()') IS NOT NULL THEN
        DROP FUNCTION mvrefresh_capture_bout_results();
    END IF;
    -- Logical captures: their publications, and their slots in this database (a capture
    -- whose `slot` was named without the mvrefresh_ prefix: drop it by hand with
    -- pg_drop_replication_slot).
    FOR p IN SELECT pubname FROM pg_publication WHERE pubname LIKE 'mvrefresh\_%' LOOP
        EXECUTE format('DROP PUBLICATION %I', p.pubname);
    END LOOP;
    PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots
    WHERE database = current_database() AND plugin = 'pgoutput'
      AND slot_name LIKE 'mvrefresh\_%';
    IF to_regclass('cron.job') IS NOT NULL THEN
        PERFORM cron.unschedule(jobid) FROM cron.job
        WHERE jobname LIKE 'mvrefresh:%' AND database = current_database();
    END IF;
END
$uninstall$;

DROP SCHEMA IF EXISTS mvrefresh CASCADE;

-- The bundled analytics (`install --analytics`) are yours to keep or drop. To drop them:
--   DROP MATERIALIZED VIEW IF EXISTS mv_weakness_patterns, mv_lane_score_distribution,
--       mv_agent_progress, mv_time_to_first_win;
--   DROP TABLE IF EXISTS analytics_weakness_patterns, analytics_lane_score_distribution,
--       analytics_agent_progress, analytics_time_to_first_win;
--   and the analytics_* functions (\df analytics_*). The operational tables are never touched.
