"""End to end: an empty MF_ROOT, `up` from the local registry, a real flow, `down`, `up` again.

The images are the production ones under their production names (the Metaflow service
built from upstream's release archives, PostgreSQL 15), pulled from the local registry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
import requests

import installer
from installer import procs
from installer.services import dsn
from installer.settings import resolve

from .conftest import stack_flags
from .flowtools import client_env, connect_remote, read_latest_run, remote_env, run_flow


def _stack_processes(flags: dict) -> list[procs.ProcInfo]:
    """Every process on the machine that belongs to this stack."""
    markers = (flags["root"], flags["udocker_dir"])
    return [p for p in procs.all_processes() if any(marker in p.command for marker in markers)]


def test_empty_root_to_tracked_run_and_back(tmp_path: Path, registry: str) -> None:
    fresh_udocker = tmp_path / "udocker"
    flags = stack_flags(tmp_path / "root", registry, udocker_dir=fresh_udocker)
    events = []
    try:
        status = installer.up(progress=events.append, **flags)
        assert status.running, status
        steps = {step["step"]: step for step in status.steps}
        detail = steps["images"]["detail"]
        assert detail.startswith("pulled 2 ("), detail
        assert "postgres:" in detail and "metaflow_metadata_service:" in detail, detail
        assert detail.endswith("created 2 container(s)"), detail
        assert [s.name for s in status.services] == ["postgres", "metadata", "ui-backend", "objectstore",
                                                    "proxy", "snapshots", "monitor"]
        assert status.schema_version is not None and status.schema_version > 0
        # A container's recorded process is its proot: no udocker Python waits beside it, and udocker
        # made no temporary passwd or group file for it (those are named after udocker's pid).
        for service in status.services:
            if service.name in ("postgres", "metadata", "ui-backend"):
                top = procs.proc_info(service.pid)
                assert top is not None and "proot" in top.cmdline[0], (service.name, top)
                assert not list(Path(tempfile.gettempdir()).glob(f"udocker-{service.pid}-*")), service.name
        assert not [p.command for p in _stack_processes(flags) if p.cmdline[:1] and "udocker" in p.cmdline[0]
                    or "installer.udocker_exec" in p.command]
        assert any(e.step == "postgres" and e.seconds is not None for e in events)

        settings = resolve(flags)
        token = installer.token(**flags)
        env = client_env(tmp_path / "home", f"http://127.0.0.1:{settings.port}/service", token,
                         settings.datastore_dir)
        done = run_flow("fanout_flow.py", env, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        run = read_latest_run("FanoutFlow", env, "total")
        assert run["successful"] is True
        assert run["artifact"] == 1 + 4 + 9
        assert run["steps"] == ["end", "join", "square", "start"]
        assert run["tasks"]["square"] == 3

        stopped = installer.down(**flags)
        assert stopped == ["monitor", "snapshots", "proxy", "objectstore", "ui-backend", "metadata",
                           "postgres"]
        assert _stack_processes(flags) == []
        for port in ("port", "metadata_port", "ui_port", "db_port"):
            assert procs.listener_of(int(flags[port])) is None, port

        again = installer.up(**flags)
        assert again.running
        assert {s["step"]: s["detail"] for s in again.steps}["images"] == "nothing to pull"
        assert read_latest_run("FanoutFlow", env, "total")["id"] == run["id"]
    finally:
        installer.down(**flags)
        shutil.rmtree(fresh_udocker, ignore_errors=True)
    assert _stack_processes(flags) == []


def test_second_up_reports_running(stack: dict) -> None:
    first = installer.up(**stack)
    assert first.running and not first.already_running
    second = installer.up(**stack)
    assert second.already_running and second.running
    assert [s.pid for s in second.services] == [s.pid for s in first.services]


def test_status_reports_schema_and_stopped_services(stack: dict) -> None:
    installer.up(**stack)
    settings = resolve(stack)
    with psycopg.connect(dsn(settings, (settings.secrets_dir / "db_password").read_text().strip())) as conn:
        tables = {row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert "goose_db_version" in tables and len(tables) > 1
    installer.down(**stack)
    status = installer.status(**stack)
    assert not status.running
    assert {s.state for s in status.services} == {"stopped"}


def _db_password(flags: dict) -> str:
    return (resolve(flags).secrets_dir / "db_password").read_text().strip()


def test_fresh_machine_restores_from_the_snapshot_folder(tmp_path: Path, registry: str) -> None:
    """A new machine (empty data folder, empty udocker folder) with the old MF_ROOT gets its runs back."""
    first = stack_flags(tmp_path / "drive" / "metaflow-stack", registry)
    work = tmp_path / "remote"
    env = remote_env(work / "home")
    try:
        assert installer.up(**first).restored is None
        connect_remote(installer.connection(**first), env, work)
        done = run_flow("fanout_flow.py", env, work)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        before = read_latest_run("FanoutFlow", env, "total")
    finally:
        installer.down(**first)
    status = installer.status(**first)
    assert status.snapshot is not None and status.snapshot["generation"] is not None
    last_generation = status.snapshot["generation"]

    # The second machine has MF_ROOT back (Drive), nothing else: no data folder, no images, no containers.
    second = {**first, "pgdata_dir": str(tmp_path / "machine2" / "pgdata"),
              "udocker_dir": str(tmp_path / "machine2" / "udocker")}
    try:
        status = installer.up(wait_ui=True, **second)
        assert status.running
        assert {s["step"]: s for s in status.steps}["images"]["detail"].startswith("pulled 2")
        assert status.restored is not None
        assert f"restored the database from snapshot {last_generation}" in status.restored
        after = read_latest_run("FanoutFlow", env, "total")
        assert after == before and after["artifact"] == 14
        base = f"http://127.0.0.1:{resolve(second).port}/api/flows/FanoutFlow/runs/{before['id']}"
        headers = {"x-api-key": installer.token(**second)}
        assert requests.get(base, headers=headers, timeout=30).json()["data"]["status"] == "completed"
        end_task = requests.get(f"{base}/steps/end/tasks", headers=headers, timeout=30).json()["data"][0]
        artifacts = requests.get(f"{base}/steps/end/tasks/{end_task['task_id']}/artifacts", headers=headers,
                                 params={"postprocess": "true", "_limit": "1000"}, timeout=60).json()["data"]
        assert {a["name"]: a["content"] for a in artifacts}["total"] == "14"
    finally:
        installer.down(**second)


def test_unusable_snapshot_folder_is_refused_with_local_only_way_out(stack: dict, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "drive-file"
    not_a_folder.write_text("a file where the snapshot folder should be")
    with pytest.raises(installer.StackError) as caught:
        installer.up(**{**stack, "snapshot_dir": str(not_a_folder)})
    assert "--no-snapshots" in str(caught.value)
    local_only = installer.up(**{**stack, "snapshot_dir": str(not_a_folder), "no_snapshots": True})
    assert local_only.running and local_only.snapshot is None
    assert "snapshots" not in [s.name for s in local_only.services]


def test_monitor_restarts_what_dies(stack: dict) -> None:
    import signal
    import time

    first = {s.name: s.pid for s in installer.up(**stack).services}
    # An idle monitor is a small process: it reads the recorded pids, and loads the stack's code
    # (psycopg and libpq among it) only once something needs starting again.
    assert "libpq" not in Path(f"/proc/{first['monitor']}/maps").read_text()
    killed = ("metadata", "proxy", "snapshots")
    metadata_guest = [p.pid for p in procs.descendants(first["metadata"])]
    for name in killed:
        os.kill(first[name], signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = {s.name: (s.pid, s.healthy) for s in installer.status(**stack).services}
        if all(now[n][0] not in (None, first[n]) and now[n][1] for n in killed):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not restarted: {now}")
    monitor_log = resolve(stack).log_path("monitor").read_text()
    for name in killed:
        assert f"{name}: died; starting it again" in monitor_log
    # The metadata service's recorded process is its proot: killing it took the guest along, so the
    # new one got the port rather than finding the old guest still holding it.
    assert metadata_guest and not [pid for pid in metadata_guest if procs.alive(pid)]
    # What did not die was left alone.
    assert now["postgres"][0] == first["postgres"] and now["ui-backend"][0] == first["ui-backend"]


def test_up_returns_once_flows_can_be_tracked_and_status_tells_when_the_ui_is_ready(stack: dict) -> None:
    status = installer.up(**stack)
    assert status.running
    steps = {step["step"]: step for step in status.steps}
    assert steps["ui-backend"]["detail"].startswith("starting on port"), steps["ui-backend"]
    assert steps["metadata"]["detail"].startswith("healthy on port")
    base = f"http://127.0.0.1:{stack['port']}"
    headers = {"x-api-key": installer.token(**stack)}
    # Flows can be tracked now: the metadata API answers through the entry point.
    assert requests.get(f"{base}/service/ping", headers=headers, timeout=10).text == "pong"
    assert requests.get(f"{base}/healthz", timeout=10).json()["status"] == "ok"

    deadline = time.monotonic() + float(stack["start_timeout"])
    while not (now := installer.status(**stack)).ui_ready:
        row = next(r for r in now.services if r.name == "ui-backend")
        assert row.starting and now.running, row
        assert time.monotonic() < deadline, "the UI backend never became ready"
        time.sleep(0.5)
    assert requests.get(f"{base}/api/ping", headers=headers, timeout=10).text == "pong"

    installer.down(**stack)
    waited = installer.up(wait_ui=True, **stack)
    assert waited.running and waited.ui_ready
    assert {s["step"]: s for s in waited.steps}["ui-backend"]["detail"].startswith("healthy on port")
