#!/usr/bin/env bash
# Local image registry for offline builds and tests.
#
# Runs Debian's `docker-registry` (the distribution registry) in plain HTTP on
# 127.0.0.1 only, detached from the calling shell.
#
# Usage: scripts/local_registry.sh start|stop|status
#
# Environment:
#   MFSTACK_CACHE          cache root (default /var/cache/mfstack); the registry
#                          keeps its blobs, config, log and pid file there
#   MFSTACK_REGISTRY_PORT  port on 127.0.0.1 (default 5000)
#   MFSTACK_REGISTRY_WAIT  seconds to wait for the health check (default 30)
set -euo pipefail

CACHE="${MFSTACK_CACHE:-/var/cache/mfstack}"
PORT="${MFSTACK_REGISTRY_PORT:-5000}"
WAIT="${MFSTACK_REGISTRY_WAIT:-30}"
REG_DIR="$CACHE/registry"
DATA_DIR="$REG_DIR/data"
CONF="$REG_DIR/config-$PORT.yml"
PIDFILE="$REG_DIR/registry-$PORT.pid"
LOG="$REG_DIR/registry-$PORT.log"
URL="http://127.0.0.1:$PORT/v2/"

die() { echo "local_registry: ERROR: $*" >&2; exit 1; }
say() { echo "local_registry: $*"; }

# HTTP status of GET /v2/ ("000" when nothing answers).
probe() {
    curl -s -o /dev/null -m 2 -w '%{http_code}' "$URL" 2>/dev/null || true
}

# PID from the pid file, if that process is alive and is a docker-registry.
running_pid() {
    local pid
    [[ -s "$PIDFILE" ]] || return 1
    pid="$(head -n1 "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    grep -q docker-registry "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

write_config() {
    mkdir -p "$DATA_DIR"
    cat >"$CONF" <<EOF
version: 0.1
log:
  level: info
  fields:
    service: mfstack-registry
storage:
  filesystem:
    rootdirectory: $DATA_DIR
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$PORT
  headers:
    X-Content-Type-Options: [nosniff]
EOF
}

cmd_status() {
    local pid code
    code="$(probe)"
    if pid="$(running_pid)"; then
        say "running (pid $pid) on 127.0.0.1:$PORT, GET /v2/ -> $code, storage $DATA_DIR"
        [[ "$code" == "200" ]] && return 0
        return 1
    fi
    if [[ "$code" != "000" ]]; then
        say "not started by this script, but something answers on 127.0.0.1:$PORT (GET /v2/ -> $code)"
        [[ "$code" == "200" ]] && return 0
        return 1
    fi
    say "not running (port $PORT)"
    return 3
}

cmd_start() {
    local pid code i
    command -v docker-registry >/dev/null || die "docker-registry not found (apt-get install docker-registry)"
    command -v curl >/dev/null || die "curl not found (apt-get install curl)"
    if pid="$(running_pid)"; then
        if [[ "$(probe)" == "200" ]]; then
            say "already running (pid $pid) on 127.0.0.1:$PORT"
            return 0
        fi
    else
        code="$(probe)"
        if [[ "$code" == "200" ]]; then
            say "a registry already answers on 127.0.0.1:$PORT (not started by this script); using it"
            return 0
        elif [[ "$code" != "000" ]]; then
            die "port $PORT is taken by something that is not a usable registry (GET /v2/ -> $code)"
        fi
        write_config
        mkdir -p "$REG_DIR"
        {
            echo "=== $(date -u +%FT%TZ) starting docker-registry on 127.0.0.1:$PORT"
        } >>"$LOG"
        # Detached in its own session, holding none of the caller's extra
        # file descriptors (a caller's lock file must not stay held).
        (
            for fd in /proc/self/fd/*; do
                fd="${fd##*/}"
                if [[ "$fd" -gt 2 ]]; then eval "exec $fd>&-" 2>/dev/null || true; fi
            done
            exec setsid docker-registry serve "$CONF" </dev/null >>"$LOG" 2>&1
        ) &
        pid=$!
        echo "$pid" >"$PIDFILE"
    fi
    for ((i = 0; i < WAIT * 10; i++)); do
        if [[ "$(probe)" == "200" ]]; then
            say "started (pid $pid) on 127.0.0.1:$PORT, log $LOG"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 20 "$LOG" >&2 || true
            die "docker-registry exited during start-up (log: $LOG)"
        fi
        sleep 0.1
    done
    tail -n 20 "$LOG" >&2 || true
    die "registry did not answer GET $URL within ${WAIT}s (pid $pid, log $LOG)"
}

cmd_stop() {
    local pid i
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        if [[ "$(probe)" != "000" ]]; then
            die "something still answers on 127.0.0.1:$PORT but it was not started by this script; not touching it"
        fi
        say "not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "pid $pid ignored SIGTERM for 10s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    kill -0 "$pid" 2>/dev/null && die "could not stop pid $pid"
    rm -f "$PIDFILE"
    [[ "$(probe)" == "000" ]] || die "port $PORT still answers after stopping pid $pid"
    say "stopped (pid $pid)"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
