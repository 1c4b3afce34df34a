-- Fill in a first heartbeat when a run or task row is written without one.
-- The function body contains semicolons, hence StatementBegin/StatementEnd.
-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION standin_default_heartbeat() RETURNS trigger AS $$
BEGIN
    IF NEW.last_heartbeat_ts IS NULL THEN
        NEW.last_heartbeat_ts := FLOOR(EXTRACT(EPOCH FROM clock_timestamp()))::BIGINT;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
-- +goose StatementEnd

DROP TRIGGER IF EXISTS runs_v3_default_heartbeat ON runs_v3;
CREATE TRIGGER runs_v3_default_heartbeat BEFORE INSERT ON runs_v3
    FOR EACH ROW EXECUTE FUNCTION standin_default_heartbeat();
DROP TRIGGER IF EXISTS tasks_v3_default_heartbeat ON tasks_v3;
CREATE TRIGGER tasks_v3_default_heartbeat BEFORE INSERT ON tasks_v3
    FOR EACH ROW EXECUTE FUNCTION standin_default_heartbeat();

-- +goose Down
DROP TRIGGER IF EXISTS tasks_v3_default_heartbeat ON tasks_v3;
DROP TRIGGER IF EXISTS runs_v3_default_heartbeat ON runs_v3;
DROP FUNCTION IF EXISTS standin_default_heartbeat();
