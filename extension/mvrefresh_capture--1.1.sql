-- mvrefresh_capture 1.1: see mvrefresh_capture.c.
\echo Use "CREATE EXTENSION mvrefresh_capture" to load this file. \quit

DO $$
BEGIN
    IF to_regnamespace('mvrefresh') IS NULL THEN
        RAISE EXCEPTION 'mvrefresh_capture: schema mvrefresh does not exist'
            USING HINT = 'Run `mvrefresh install` first, then CREATE EXTENSION mvrefresh_capture, then `mvrefresh install` again.';
    END IF;
END
$$;

-- Version 1.0's functions, for triggers that `mvrefresh install` has not replaced yet (and so
-- that a fresh 1.1 has what an updated one has: a dump of the latter restores into the former).
-- One function per capture slot: a capture's triggers call their own, whose OID tells the
-- captures apart. They run in the writers' WHEN clauses (as the writer: EXECUTE stays granted to
-- PUBLIC, but a writer needs no USAGE on schema mvrefresh for that); a direct call only reads
-- the caller's own memory, and checks the generation again at its next statement.
DO $$
BEGIN
    FOR slot IN 0..63 LOOP
        EXECUTE format('CREATE FUNCTION mvrefresh.%I(anyelement, anyelement) RETURNS boolean
                            LANGUAGE c VOLATILE PARALLEL UNSAFE
                            AS %L, %L',
                       'native_unseen_' || slot, 'MODULE_PATHNAME', 'mvrefresh_native_unseen');
    END LOOP;
END
$$;

-- Remembers a key as dirty in the calling session: only the capture triggers' functions (run
-- as the owner of schema mvrefresh, the role that installed it) may, so that no writer can hide
-- a change.
CREATE FUNCTION mvrefresh.native_remember(pg_catalog.regprocedure, anyelement, pg_catalog.int8)
RETURNS void LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'mvrefresh_native_remember';
REVOKE ALL ON FUNCTION mvrefresh.native_remember(pg_catalog.regprocedure, anyelement, pg_catalog.int8) FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('GRANT EXECUTE ON FUNCTION mvrefresh.native_remember(pg_catalog.regprocedure, anyelement, pg_catalog.int8) TO %s',
                   (SELECT n.nspowner::regrole FROM pg_namespace AS n WHERE n.nspname = 'mvrefresh'));
END
$$;

-- A capture's row trigger: native_capture('<capture function>()', '<key column>'). Only the
-- owner of schema mvrefresh (the role that installs the captures) may create such a trigger,
-- and the function it names must be a capture function: a trigger function capture_* of
-- schema mvrefresh owned by that owner (checked when the trigger fires).
CREATE FUNCTION mvrefresh.native_capture() RETURNS trigger
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'mvrefresh_native_capture';

-- Statement triggers on mvrefresh.dirty: rows leaving it make every session forget.
CREATE FUNCTION mvrefresh.native_dirty_changed() RETURNS trigger
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'mvrefresh_native_dirty_changed';

-- The memory's epoch, and keeping a key in it (only the capture functions, which run as the
-- owner of schema mvrefresh, may: no writer can hide a change).
CREATE FUNCTION mvrefresh.native_epoch() RETURNS pg_catalog.int8
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'mvrefresh_native_epoch';
CREATE FUNCTION mvrefresh.native_keep(pg_catalog.regprocedure, anyelement, pg_catalog.int8)
RETURNS void LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'mvrefresh_native_keep';

-- Every session forgets once the calling transaction commits (`mvrefresh install` calls it).
CREATE FUNCTION mvrefresh.native_forget() RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'mvrefresh_native_forget';

REVOKE ALL ON FUNCTION mvrefresh.native_capture(), mvrefresh.native_dirty_changed(),
    mvrefresh.native_epoch(), mvrefresh.native_keep(pg_catalog.regprocedure, anyelement, pg_catalog.int8),
    mvrefresh.native_forget() FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('GRANT EXECUTE ON FUNCTION mvrefresh.native_capture(), mvrefresh.native_dirty_changed(),
                        mvrefresh.native_epoch(), mvrefresh.native_keep(pg_catalog.regprocedure, anyelement, pg_catalog.int8),
                        mvrefresh.native_forget() TO %s',
                   (SELECT n.nspowner::regrole FROM pg_namespace AS n WHERE n.nspname = 'mvrefresh'));
END
$$;
