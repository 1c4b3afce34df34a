-- Schema of the TEST stand-in image (not the upstream schema).
-- +goose Up
CREATE TABLE IF NOT EXISTS flows_v3 (
    flow_id     VARCHAR(255) PRIMARY KEY,
    user_name   VARCHAR(255),
    ts_epoch    BIGINT NOT NULL,
    tags        JSONB,
    system_tags JSONB
);

CREATE TABLE IF NOT EXISTS runs_v3 (
    flow_id           VARCHAR(255) NOT NULL REFERENCES flows_v3 (flow_id),
    run_number        BIGSERIAL,
    user_name         VARCHAR(255),
    ts_epoch          BIGINT NOT NULL,
    last_heartbeat_ts BIGINT,
    tags              JSONB,
    system_tags       JSONB,
    PRIMARY KEY (flow_id, run_number)
);

CREATE TABLE IF NOT EXISTS steps_v3 (
    flow_id     VARCHAR(255) NOT NULL,
    run_number  BIGINT NOT NULL,
    step_name   VARCHAR(255) NOT NULL,
    user_name   VARCHAR(255),
    ts_epoch    BIGINT NOT NULL,
    tags        JSONB,
    system_tags JSONB,
    PRIMARY KEY (flow_id, run_number, step_name)
);

CREATE TABLE IF NOT EXISTS tasks_v3 (
    flow_id           VARCHAR(255) NOT NULL,
    run_number        BIGINT NOT NULL,
    step_name         VARCHAR(255) NOT NULL,
    task_id           BIGSERIAL,
    user_name         VARCHAR(255),
    ts_epoch          BIGINT NOT NULL,
    last_heartbeat_ts BIGINT,
    tags              JSONB,
    system_tags       JSONB,
    PRIMARY KEY (flow_id, run_number, step_name, task_id)
);

CREATE TABLE IF NOT EXISTS metadata_v3 (
    id          BIGSERIAL PRIMARY KEY,
    flow_id     VARCHAR(255) NOT NULL,
    run_number  BIGINT NOT NULL,
    step_name   VARCHAR(255) NOT NULL,
    task_id     BIGINT NOT NULL,
    field_name  VARCHAR(255) NOT NULL,
    value       TEXT NOT NULL,
    type        VARCHAR(255),
    user_name   VARCHAR(255),
    ts_epoch    BIGINT NOT NULL,
    tags        JSONB,
    system_tags JSONB
);

CREATE TABLE IF NOT EXISTS artifact_v3 (
    flow_id     VARCHAR(255) NOT NULL,
    run_number  BIGINT NOT NULL,
    step_name   VARCHAR(255) NOT NULL,
    task_id     BIGINT NOT NULL,
    name        VARCHAR(255) NOT NULL,
    attempt_id  SMALLINT NOT NULL DEFAULT 0,
    location    TEXT,
    ds_type     VARCHAR(255),
    sha         VARCHAR(255),
    type        VARCHAR(255),
    content_type VARCHAR(255),
    user_name   VARCHAR(255),
    ts_epoch    BIGINT NOT NULL,
    tags        JSONB,
    system_tags JSONB,
    PRIMARY KEY (flow_id, run_number, step_name, task_id, attempt_id, name)
);

-- +goose Down
DROP TABLE IF EXISTS artifact_v3;
DROP TABLE IF EXISTS metadata_v3;
DROP TABLE IF EXISTS tasks_v3;
DROP TABLE IF EXISTS steps_v3;
DROP TABLE IF EXISTS runs_v3;
DROP TABLE IF EXISTS flows_v3;
