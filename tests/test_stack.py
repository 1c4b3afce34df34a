"""End to end: an empty MF_ROOT, `up` from the local registry, a real flow, `down`, `up` again.

The service image here is the project's TEST image (images/service-standin),
which plays the part of netflixoss/metaflow_metadata_service offline with the
same contract; PostgreSQL is real PostgreSQL 15 in a udocker container.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest

import installer
from installer import procs
from installer.services import dsn
from installer.settings import resolve

from .conftest import stack_flags
from .flowtools import client_env, read_latest_run, run_flow


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
        assert steps["images"]["detail"].startswith("pulled 2"), steps["images"]
        assert [s.name for s in status.services] == ["postgres", "metadata", "ui-backend", "objectstore",
                                                    "proxy", "snapshots", "monitor"]
        assert status.schema_version is not None and status.schema_version > 0
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
    """A new machine (empty data folder) with the old snapshot folder gets the database back."""
    shared_drive = tmp_path / "drive"
    first = stack_flags(tmp_path / "machine1", registry)
    first["snapshot_dir"] = str(shared_drive)
    try:
        assert installer.up(**first).restored is None
        settings = resolve(first)
        with psycopg.connect(dsn(settings, _db_password(first))) as conn:
            conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
            conn.execute("INSERT INTO notes VALUES (1, 'kept across machines')")
    finally:
        installer.down(**first)
    status = installer.status(**first)
    assert status.snapshot is not None and status.snapshot["generation"] is not None

    # The second machine shares only the snapshot folder (and the secrets, which live in MF_ROOT on Drive).
    second = stack_flags(tmp_path / "machine1", registry)
    second.update(snapshot_dir=str(shared_drive), pgdata_dir=str(tmp_path / "machine2-pgdata"))
    try:
        status = installer.up(**second)
        assert status.running
        assert status.restored is not None and "restored the database from snapshot" in status.restored
        assert status.snapshot["generation"] in status.restored
        with psycopg.connect(dsn(resolve(second), _db_password(second))) as conn:
            assert conn.execute("SELECT body FROM notes WHERE id = 1").fetchone() == ("kept across machines",)
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
    for name in ("proxy", "snapshots"):
        os.kill(first[name], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = {s.name: (s.pid, s.healthy) for s in installer.status(**stack).services}
        if all(now[n][0] not in (None, first[n]) and now[n][1] for n in ("proxy", "snapshots")):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not restarted: {now}")
    monitor_log = resolve(stack).log_path("monitor").read_text()
    assert "proxy: died; starting it again" in monitor_log
    assert "snapshots: died; starting it again" in monitor_log
    # What did not die was left alone.
    assert now["postgres"][0] == first["postgres"] and now["metadata"][0] == first["metadata"]
