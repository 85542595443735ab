-- The discovery service's operational tables (Layer 4, "Discovery Persistence"), as the design
-- document describes them: discovery runs and their per-star results, with the three composite
-- indexes it lists. Load it before views.sql. Idempotent: every statement is IF NOT EXISTS, so
-- loading it twice changes nothing.
--
-- The contract with mvrefresh (see config.toml beside this file): a run's results are written
-- while the run is incomplete, then the run is marked complete (`is_complete = true`, the
-- document's `mark_run_complete(run_id)`), and only that — never a results row — tells the
-- daemon to refresh the five views. Results of incomplete runs count in no view.

-- One discovery run: an anomaly-detection or a clustering pass over a set of stars.
CREATE TABLE IF NOT EXISTS discovery_runs (
    -- The service's run ids are strings (UUIDs in practice: `/clusters/abc-123-def/sizes`).
    run_id       text PRIMARY KEY,
    -- 'anomaly' or 'clustering' in the service; the views call a run of type 'anomaly' an
    -- anomaly run (the overlap matrix and the star frequency are about those). Not constrained
    -- here so that a new run type needs no migration.
    run_type     text NOT NULL,
    -- The parameters the run was made with (the overlap matrix exists to compare them). No view
    -- reads them, so they are not in the capture's `columns`.
    parameters   jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set once every result of the run is saved. NOT NULL: the capture's `when = "is_complete"`
    -- must never meet an unknown.
    is_complete  boolean NOT NULL DEFAULT false,
    -- When the run was marked complete. Setting it again on a complete run (`UPDATE
    -- discovery_runs SET completed_at = now() WHERE run_id = …`) re-announces the run, e.g.
    -- after correcting its results (see README.md).
    completed_at timestamptz
);

-- One star's outcome in one run.
CREATE TABLE IF NOT EXISTS discovery_results (
    result_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id        text NOT NULL REFERENCES discovery_runs (run_id) ON DELETE CASCADE,
    star_id       bigint NOT NULL,
    -- INTEGER 0/1, not boolean: the service's model stores it that way.
    is_anomaly    integer NOT NULL DEFAULT 0 CHECK (is_anomaly IN (0, 1)),
    anomaly_score double precision,
    -- The cluster the star was assigned to; NULL is noise (not assigned to any cluster). In a
    -- run that does no clustering every star is noise.
    cluster_id    integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- A star is analyzed at most once per run, so counts of rows are counts of stars.
    CONSTRAINT discovery_results_run_star UNIQUE (run_id, star_id)
);

-- The document's three composite indexes.
-- Anomaly-only queries per run.
CREATE INDEX IF NOT EXISTS idx_discovery_results_run_anomaly
    ON discovery_results (run_id, is_anomaly);
-- Cluster member retrieval.
CREATE INDEX IF NOT EXISTS idx_discovery_results_run_cluster
    ON discovery_results (run_id, cluster_id);
-- Filtered and sorted run listings.
CREATE INDEX IF NOT EXISTS idx_discovery_runs_type_created
    ON discovery_runs (run_type, created_at DESC);
