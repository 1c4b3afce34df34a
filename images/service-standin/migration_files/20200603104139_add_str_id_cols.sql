-- Text identifiers next to the numeric ones (TEST stand-in schema).
-- +goose Up
ALTER TABLE runs_v3 ADD COLUMN IF NOT EXISTS run_id VARCHAR(255);
ALTER TABLE runs_v3 ADD CONSTRAINT runs_v3_run_id_unique UNIQUE (flow_id, run_id);
ALTER TABLE tasks_v3 ADD COLUMN IF NOT EXISTS task_name VARCHAR(255);

-- +goose Down
ALTER TABLE tasks_v3 DROP COLUMN IF EXISTS task_name;
ALTER TABLE runs_v3 DROP CONSTRAINT IF EXISTS runs_v3_run_id_unique;
ALTER TABLE runs_v3 DROP COLUMN IF EXISTS run_id;
