-- mvrefresh bundled analytics, step 1 of 7: the operational tables and the indexes the analytics
-- need.
--
-- The operational tables belong to the application. They are created here only when missing (so
-- a fresh database, a test or a benchmark has them) and are never altered: when they already
-- exist, they are used as they are. The analytics need these columns:
--   submissions(id, agent_id, challenge_id, bout_id, status, final_lane_scores, composite_score,
--               created_at)
--   bout_results(bout_id, challenge_id, winner_agent_id)
--
-- Indexes. `CREATE INDEX IF NOT EXISTS` only checks the name, and inside the install
-- transaction it cannot be CONCURRENTLY, so on a large live table it blocks writers while it
-- builds. On such a table create them beforehand, under the same names, with
--   CREATE INDEX CONCURRENTLY submissions_scored_challenge_idx ...
-- and the install finds them and does nothing.

CREATE TABLE IF NOT EXISTS submissions (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id          uuid NOT NULL,
    challenge_id      uuid NOT NULL,
    bout_id           uuid,
    status            text NOT NULL DEFAULT 'pending',
    final_lane_scores jsonb,                 -- {"correctness": 87.5, "speed": 61, ...}
    composite_score   double precision,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS bout_results (
    bout_id         uuid PRIMARY KEY,
    challenge_id    uuid NOT NULL,
    winner_agent_id uuid,                    -- NULL: undecided or a draw
    decided_at      timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS judge_outputs (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    submission_id uuid NOT NULL,
    judge         text NOT NULL,
    output        jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Drives every per-challenge recompute (analytics_refresh_*(keys)): all four analytics read only
-- the scored submissions of the given challenges (leading column). agent_id, created_at let the
-- time-to-first-win recompute walk each agent's submissions in time order and stop at its first
-- win, and make its first-submission scan index-only. Partial, so pending/failed rows (the hot,
-- often updated part of the table) do not maintain it until they become scored.
CREATE INDEX IF NOT EXISTS submissions_scored_challenge_idx
    ON submissions (challenge_id, agent_id, created_at) WHERE status = 'scored';

-- The submissions of a bout: used by the bout_results capture trigger (which challenges does a
-- new winner affect?) and by the live UI. Partial: practice submissions have no bout.
CREATE INDEX IF NOT EXISTS submissions_bout_idx
    ON submissions (bout_id) WHERE bout_id IS NOT NULL;

-- Did this agent win this bout? The time-to-first-win recompute asks it for each of a
-- challenge's agents' submissions until the first win; with both columns in the index the answer
-- comes from the index alone (about a third faster than probing the primary key and the heap).
-- Partial: only bouts with a winner can answer yes.
CREATE INDEX IF NOT EXISTS bout_results_winner_idx
    ON bout_results (bout_id, winner_agent_id) WHERE winner_agent_id IS NOT NULL;

-- The judges' outputs of a submission (live UI; not read by the analytics).
CREATE INDEX IF NOT EXISTS judge_outputs_submission_idx
    ON judge_outputs (submission_id);
