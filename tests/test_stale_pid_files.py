"""A pid file that outlived its process never gets another process signalled.

postmaster.pid travels with a data folder (copied, restored, left by a machine that died) and its
pid can belong to any process since; a notebook's Metaflow task that got PostgreSQL's stop signal
(SIGINT) would die with "Aborted!".
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from installer import procs
from installer.services import Health, Service, StopPolicy
from installer.snapshot.restore import _running_postmaster
from installer.stopping import stop


def _innocent() -> subprocess.Popen:
    """A `sleep` that runs (exec done: until then its command line is still this Python's)."""
    proc = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = procs.proc_info(proc.pid)
        if info is not None and info.cmdline[:1] == ("sleep",):
            return proc
        time.sleep(0.01)
    raise AssertionError("sleep did not start")


def test_a_pid_file_names_its_process_only_if_that_process_runs_the_program(tmp_path: Path) -> None:
    bystander = _innocent()
    try:
        pid_file = tmp_path / "postmaster.pid"
        pid_file.write_text(f"{bystander.pid}\n{tmp_path}\n")
        assert procs.pid_file_owner(pid_file, "sleep") == bystander.pid
        assert procs.pid_file_owner(pid_file, "postgres") is None
        assert _running_postmaster(tmp_path) is None
        for junk in ("", "abc\n", "-1\n", "0\n"):
            pid_file.write_text(junk)
            assert procs.pid_file_owner(pid_file, "sleep") is None
        assert procs.pid_file_owner(tmp_path / "missing.pid", "sleep") is None
    finally:
        bystander.kill()
        bystander.wait()


def test_stopping_postgres_with_a_stale_pid_file_leaves_the_process_now_holding_that_pid(tmp_path: Path) -> None:
    bystander = _innocent()
    postgres_like = _innocent()  # what the stack recorded as the service's own process
    try:
        (tmp_path / "postmaster.pid").write_text(f"{bystander.pid}\n{tmp_path}\n")
        service = Service(name="postgres", title="PostgreSQL", port=1, argv=("postgres",),
                          health=Health("process", ""), stop=StopPolicy.POSTMASTER)
        stop(service, postgres_like.pid, tmp_path)
        time.sleep(0.2)
        assert bystander.poll() is None, "the process holding the stale pid was signalled"
        assert postgres_like.poll() is not None, "the recorded process was not stopped"
    finally:
        for proc in (bystander, postgres_like):
            proc.kill()
            proc.wait()
