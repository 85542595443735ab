-- mvrefresh_capture 1.0 to 1.1: a C row trigger instead of the WHEN of PL/pgSQL triggers, and
-- invalidations instead of a read of the generation at every statement (see mvrefresh_capture.c).
-- Version 1.0's functions stay, for triggers `mvrefresh install` has not replaced yet. There is
-- no script of 1.1 alone: CREATE EXTENSION runs 1.0's, then this one, so a fresh 1.1 and an
-- updated one are the same (a dump of either restores into the other).
\echo Use "ALTER EXTENSION mvrefresh_capture UPDATE" to load this file. \quit

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
