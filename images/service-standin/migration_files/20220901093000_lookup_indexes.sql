-- +goose NO TRANSACTION
-- CREATE INDEX CONCURRENTLY cannot run inside a transaction block:
-- each statement runs on its own, in autocommit.
-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS metadata_v3_by_task
    ON metadata_v3 (flow_id, run_number, step_name, task_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS artifact_v3_by_name
    ON artifact_v3 (flow_id, name);
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_v3_by_ts
    ON runs_v3 (ts_epoch);

-- +goose Down
DROP INDEX CONCURRENTLY IF EXISTS runs_v3_by_ts;
DROP INDEX CONCURRENTLY IF EXISTS artifact_v3_by_name;
DROP INDEX CONCURRENTLY IF EXISTS metadata_v3_by_task;
