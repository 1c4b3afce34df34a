"""After a restore, a run whose files did not all reach the object store is not shown as finished,
and the Metaflow client and the UI say the same of every run (the real stack, real flows).

The torn state is made by hand, the way a runtime that died leaves it on Drive: the database (its
WAL) arrived, some of the runs' objects did not. Five runs of StampFlow, each writing artifacts
unique to it: the first stays whole (its silent steps' logs are empty on purpose); the second loses
the object of one task's artifact; the third loses its end task's log; the fourth gets that log's
name without its content (an empty file, as Drive leaves a renamed file whose content was not
uploaded); the fifth has its end task's `attempt_ok` but only part of its artifacts' rows (Metaflow
records `attempt_ok` first, then the artifacts one row at a time). A new machine then restores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import requests

import installer
from installer.objectstore import empty_marker
from installer.reconcile import LOST_FIELD
from installer.settings import resolve
from installer.stack import dsn
from tests.flowtools import connect_remote, remote_env, run_flow


def run_id_of(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in (done.stdout + done.stderr).splitlines() if "Workflow starting (run-id" in line)
    return line.split("(run-id ", 1)[1].split(")", 1)[0]


def client_view(env: dict[str, str], cwd: Path) -> dict:
    """Every StampFlow run as the Metaflow client sees it, reading every artifact and log of the
    successful ones."""
    code = textwrap.dedent("""
        import json
        from metaflow import Flow, namespace
        namespace(None)
        runs = {}
        for run in Flow("StampFlow"):
            view = {"successful": run.successful, "finished": run.finished, "lost": {}}
            for step in run:
                for task in step:
                    lost = task.metadata_dict.get("mfstack-data-lost")
                    if lost:
                        view["lost"][task.pathspec] = lost
                    if run.successful:
                        [artifact.data for artifact in task]  # every artifact of a successful run reads
                        view.setdefault("stdout", []).append(task.stdout)
            runs[run.id] = view
        print(json.dumps(runs))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ui_status(base: str, token: str, run: str) -> str:
    answer = requests.get(f"{base}/api/flows/StampFlow/runs/{run}", headers={"x-api-key": token}, timeout=30)
    answer.raise_for_status()
    return answer.json()["data"]["status"]


def test_runs_whose_objects_were_lost_are_shown_failed_by_client_and_ui_alike(stack: dict, tmp_path: Path) -> None:
    assert installer.up(**stack).running
    client = tmp_path / "client"
    env = remote_env(client / "home")
    connect_remote(installer.connection(**stack), env, client)
    whole, torn_artifact, torn_log, emptied_log, unregistered = (
        run_id_of(run_flow("stamp_flow.py", env, client)) for _ in range(5))
    settings = resolve(stack)
    password = (settings.secrets_dir / "db_password").read_text().strip()
    bucket = settings.objects_dir / "metaflow" / "data" / "StampFlow"
    with psycopg.connect(dsn(settings, password)) as conn:
        sha = conn.execute("SELECT sha FROM artifact_v3 WHERE flow_id = 'StampFlow' AND run_number = %s"
                           " AND name = 'piece' ORDER BY task_id LIMIT 1", (int(torn_artifact),)).fetchone()[0]
        conn.execute("DELETE FROM artifact_v3 WHERE flow_id = 'StampFlow' AND run_number = %(run)s"
                     " AND step_name = 'end' AND name <> (SELECT name FROM artifact_v3 WHERE flow_id = 'StampFlow'"
                     " AND run_number = %(run)s AND step_name = 'end' ORDER BY ts_epoch, name LIMIT 1)",
                     {"run": int(unregistered)})
    assert installer.down(**stack)  # the final snapshot holds all three runs

    (bucket / "data" / sha[:2] / sha).unlink()
    end_logs = list((bucket / torn_log / "end").glob("*/0.runtime_stdout.log"))
    assert len(end_logs) == 1
    end_logs[0].unlink()
    (emptied,) = (bucket / emptied_log / "end").glob("*/0.runtime_stdout.log")
    emptied.write_bytes(b"")
    # The store marked the logs written empty on purpose (the silent start step's), not the emptied one.
    (silent_start,) = (bucket / whole / "start").glob("*/0.runtime_stdout.log")
    assert silent_start.stat().st_size == 0 and empty_marker(silent_start).exists()
    assert not empty_marker(emptied).exists()

    # A new machine: an empty data folder, the same MF_ROOT (objects and snapshots).
    restored = {**stack, "pgdata_dir": str(tmp_path / "machine2-pgdata")}
    status = installer.up(wait_ui=True, **restored)
    try:
        assert status.running and status.restored, status
        detail = {step["step"]: step["detail"] for step in status.steps}["postgres"]
        assert f"StampFlow/{torn_artifact}" in detail and f"StampFlow/{torn_log}" in detail, detail
        assert f"StampFlow/{emptied_log}" in detail and f"StampFlow/{unregistered}" in detail, detail
        assert f"StampFlow/{whole}," not in detail and not detail.endswith(f"StampFlow/{whole}"), detail

        runs = client_view(env, client)
        assert runs[whole]["successful"] and runs[whole]["finished"] and not runs[whole]["lost"]
        assert any(f"stamp run {whole}" in out for out in runs[whole]["stdout"])
        for run in (torn_artifact, torn_log, emptied_log, unregistered):
            assert not runs[run]["successful"] and not runs[run]["finished"], runs[run]
            assert runs[run]["lost"], runs[run]
        assert any("artifact piece" in why for why in runs[torn_artifact]["lost"].values())
        assert any("its log" in why for why in runs[torn_log]["lost"].values())
        assert any("its log" in why for why in runs[emptied_log]["lost"].values())
        assert any("registration of artifact" in why for why in runs[unregistered]["lost"].values())

        base = installer.connection(**restored).split("/?token=")[0]
        token = settings.token_file.read_text().strip()
        assert ui_status(base, token, whole) == "completed"
        assert ui_status(base, token, torn_artifact) == "failed"
        for run in (torn_log, emptied_log, unregistered):
            assert ui_status(base, token, run) == "failed"

        # The store never points at what is not there: every artifact row left has its object.
        with psycopg.connect(dsn(settings, password)) as conn:
            left = conn.execute("SELECT sha FROM artifact_v3 WHERE flow_id = 'StampFlow'").fetchall()
            lost_rows = conn.execute("SELECT count(*) FROM metadata_v3 WHERE field_name = %s",
                                     (LOST_FIELD,)).fetchone()[0]
        assert all((bucket / "data" / row[0][:2] / row[0]).is_file() for row in left)
        assert lost_rows == 5  # the second run's torn part task and its end task; the end task of each other

        # A content-addressed object Drive tore (its name arrived, its content did not) is written again
        # by the next run that produces the same content: Metaflow writes only objects the store says
        # are absent, so a torn one served as present would fail every foreach run from then on.
        with psycopg.connect(dsn(settings, password)) as conn:
            items_sha = conn.execute("SELECT sha FROM artifact_v3 WHERE flow_id = 'StampFlow' AND name = 'items'"
                                     " LIMIT 1").fetchone()[0]
        torn_items = bucket / "data" / items_sha[:2] / items_sha
        torn_items.write_bytes(b"")

        # New runs get new ids and finish.
        after = run_id_of(run_flow("stamp_flow.py", env, client))
        assert int(after) > max(int(run) for run in (whole, torn_artifact, torn_log, emptied_log, unregistered))
        assert torn_items.stat().st_size > 0 and not empty_marker(torn_items).exists()
    finally:
        installer.down(**restored)
