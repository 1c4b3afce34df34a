"""One crash round of the whole stack with real Metaflow runs as the write load.

A stack comes up (production images from the local registry), a client connected from another
HOME runs TickFlow over and over, and at a random instant every process of the stack and the
client is SIGKILLed, as when a runtime dies. A new "machine" (an empty PGDATA, the same MF_ROOT
and snapshot folder) then starts the stack, which restores the newest good snapshot. Checked:
the runs the client lists as successful are exactly the finished runs up to some point (a prefix),
the restored database passes pg_amcheck, and the next run gets an id no earlier run had.

With `drive` (DriveMount settings) MF_ROOT is on the Drive-like mount as on Colab (state, secrets,
logs, object store and snapshots; PGDATA and caches on local disk), the mount dies with the rest
and the new machine starts from a fresh mount of only what was uploaded, with empty local disks.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests

import installer
from installer import procs
from installer.errors import SnapshotError
from installer.services import DB_USER, dsn, snapshot_status_file
from installer.settings import resolve
from installer.snapshot import SnapshotStatus, read_status

from .drivefs import DriveMount
from .flowtools import FLOWS, connect_remote, remote_env
from .helpers_pg import PG_BIN, require_pg15

_RUN_ID = re.compile(r"Workflow starting \(run-id (\d+)\)")


@dataclass
class MetaflowRound:
    finished: list[int]  # run ids that finished successfully before the kill, in order
    restored: list[int]  # successful run ids the client lists after the restore
    next_id: int  # the id of the first run after the restore
    loss_window_s: float  # a lost finished run's end minus the newest restored record (0: none lost)
    restore_note: str
    ends: dict[int, float] = field(default_factory=dict)
    mid_snapshot: bool = False  # the watcher or a `snapshot` process was taking a generation at the kill
    amcheck: str = ""  # pg_amcheck's report on the restored database


class _Runner(threading.Thread):
    """Runs TickFlow back to back; records each run's id and the instant it finished."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        super().__init__(daemon=True)
        self.env, self.cwd = env, cwd
        self.finished: list[int] = []
        self.ends: dict[int, float] = {}
        self.stop = threading.Event()
        self.current: subprocess.Popen | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            self.current = subprocess.Popen([sys.executable, str(FLOWS / "tick_flow.py"), "--no-pylint", "run"],
                                            env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
            output, _ = self.current.communicate()
            ended = time.time()
            found = _RUN_ID.search(output or "")
            if self.current.returncode == 0 and found and not self.stop.is_set():
                self.finished.append(int(found.group(1)))
                self.ends[int(found.group(1))] = ended


class _Snapshotter(threading.Thread):
    """Takes a snapshot from another process every few seconds, as someone pressing "snapshot now"
    would: each one also makes the watcher start a new generation, so the kill can land in the
    middle of one (a WAL piece is the usual write between generations)."""

    def __init__(self, flags: dict, rng: random.Random, every: tuple[float, float]) -> None:
        super().__init__(daemon=True)
        self.code = f"import installer; installer.snapshot(**{flags!r})"
        self.waits = [rng.uniform(*every) for _ in range(1000)]
        self.stop = threading.Event()
        self.current: subprocess.Popen | None = None
        self.taken = 0

    def run(self) -> None:
        for wait in self.waits:
            if self.stop.wait(wait):
                return
            self.current = subprocess.Popen([sys.executable, "-c", self.code], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
            self.taken += self.current.wait() == 0

    def busy(self) -> bool:
        return self.current is not None and self.current.poll() is None


def runtime_processes(markers: tuple[str, ...]) -> list[int]:
    """Every process of the stack: those naming its folders, and everything they started (the guests
    under proot name only their own paths)."""
    roots = [p.pid for p in procs.all_processes()
             if p.pid != os.getpid() and any(marker in p.command for marker in markers)]
    return list(dict.fromkeys(roots + [d.pid for pid in roots for d in procs.descendants(pid)]))


def _successful_runs(env: dict[str, str], cwd: Path) -> list[int]:
    code = ("from metaflow import Flow, namespace\nnamespace(None)\n"
            "print(sorted(int(r.id) for r in Flow('TickFlow') if r.successful))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0 and "MetaflowNotFound" in done.stderr:
        return []
    assert done.returncode == 0, done.stderr[-3000:]
    return eval(done.stdout.strip().splitlines()[-1])  # a printed list of ints


def amcheck_stack(flags: dict) -> str:
    """pg_amcheck (B-tree and heap, every database) on the stack's PostgreSQL; raises with its report."""
    require_pg15()
    settings = resolve(flags)
    password = (settings.secrets_dir / "db_password").read_text().strip()
    done = subprocess.run([str(PG_BIN / "pg_amcheck"), "-h", "127.0.0.1", "-p", str(settings.db_port),
                           "-U", DB_USER, "--all", "--install-missing", "--heapallindexed", "--rootdescend"],
                          env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"pg_amcheck found problems in the restored database (exit {done.returncode}):\n"
                             f"{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


def newest_record(flags: dict) -> float:
    """When the newest record in the metadata database was written (unix time): the service
    stamps every row of every table with ts_epoch (ms) as it inserts it."""
    settings = resolve(flags)
    password = (settings.secrets_dir / "db_password").read_text().strip()
    with psycopg.connect(dsn(settings, password)) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.columns WHERE column_name = 'ts_epoch'"
            " AND table_schema = 'public'")]
        newest = max((conn.execute(f'SELECT coalesce(max(ts_epoch), 0) FROM "{table}"').fetchone()[0]
                      for table in tables), default=0)
    return newest / 1000.0


def metaflow_round(work: Path, flags: dict, rng: random.Random, *, min_runs: int = 1,
                   max_wait: float = 20.0, drive: dict | None = None,
                   snapshot_every: tuple[float, float] | None = None, after_run: float | None = None,
                   inspect: Callable[[dict, dict[str, str], Path], None] | None = None) -> MetaflowRound:
    """Up, runs, SIGKILL at a random instant after `min_runs` finished runs, restore on a new PGDATA, check.
    With `snapshot_every` (seconds, low and high) snapshots are also taken at random intervals meanwhile.
    With `after_run` the kill comes 0..`after_run` seconds after a run finished instead: when the
    newest run's records are still on their way to the snapshot folder (the loss window).
    `inspect(flags, client environment, client folder)` looks at the restored stack before it stops."""
    mount = None
    if drive is not None:
        mount = DriveMount(work / "content" / "drive", work / "google", seed=rng.randrange(1 << 30),
                           **drive).start()
        (mount.mountpoint / "MyDrive").mkdir()
        flags = {**flags, "root": str(mount.mountpoint / "MyDrive" / "metaflow-stack")}
    try:
        return _metaflow_round(work, flags, rng, min_runs, max_wait, mount, snapshot_every, after_run, inspect)
    finally:
        # A round that failed half-way must not leave its stack running (every process names `work`).
        leftovers = runtime_processes((str(work),))
        for pid in leftovers:
            procs.send(pid, signal.SIGKILL)
        procs.wait_gone(leftovers, 30)
        if mount is not None:
            mount.kill()


def _metaflow_round(work: Path, flags: dict, rng: random.Random, min_runs: int, max_wait: float,
                    mount: DriveMount | None, snapshot_every: tuple[float, float] | None,
                    after_run: float | None, inspect: Callable[[dict, dict[str, str], Path], None] | None
                    ) -> MetaflowRound:
    first = {**flags, "pgdata_dir": str(work / "machine1-pgdata")}
    if mount is not None:
        first["cache_dir"] = str(work / "machine1-cache")
    assert installer.up(**first).running
    client = work / "client"
    env = remote_env(client / "home")
    connect_remote(installer.connection(**first), env, client)
    runner = _Runner(env, client)
    runner.start()
    snapshotter = _Snapshotter(first, rng, snapshot_every) if snapshot_every else None
    if snapshotter is not None:
        snapshotter.start()
    deadline = time.monotonic() + 300
    while len(runner.finished) < min_runs:
        assert time.monotonic() < deadline and runner.is_alive(), "no run finished within 300 s"
        time.sleep(0.2)
    if after_run is None:
        time.sleep(rng.uniform(0.0, max_wait))
    else:
        seen = len(runner.finished)
        while len(runner.finished) == seen:
            assert time.monotonic() < deadline + 300 and runner.is_alive(), "no further run finished"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, after_run))
    # The runtime dies: the stack, the client and its flow, all at once.
    runner.stop.set()
    try:
        mid_snapshot = (read_status(snapshot_status_file(resolve(first))) or SnapshotStatus()).state == "snapshotting"
    except SnapshotError:
        mid_snapshot = False
    if snapshotter is not None:
        snapshotter.stop.set()
        mid_snapshot = mid_snapshot or snapshotter.busy()
    victims = runtime_processes((flags["root"], str(work / "machine1-pgdata")))
    if snapshotter is not None and snapshotter.busy():
        victims.append(snapshotter.current.pid)
    if mount is not None and mount.proc is not None:
        victims.append(mount.proc.pid)
    if runner.current is not None and runner.current.poll() is None:
        victims += [runner.current.pid] + [p.pid for p in procs.descendants(runner.current.pid)]
    for pid in victims:
        procs.send(pid, signal.SIGKILL)
    runner.join(timeout=60)
    if snapshotter is not None:
        snapshotter.join(timeout=60)
    procs.wait_gone(victims, 30)
    finished, ends = list(runner.finished), dict(runner.ends)
    if mount is not None:
        mount.kill()
        mount = mount.fresh()  # the new runtime's Drive: only what reached Google

    second = {**flags, "pgdata_dir": str(work / "machine2-pgdata")}
    if mount is not None:
        second["cache_dir"] = str(work / "machine2-cache")
    try:
        status = installer.up(**second)
        assert status.running and status.restored, status
        report = amcheck_stack(second)
        newest = newest_record(second)
        restored = _successful_runs(env, client)
        if inspect is not None:
            inspect(second, env, client)
        done = subprocess.run([sys.executable, str(FLOWS / "tick_flow.py"), "--no-pylint", "run"], env=env,
                              cwd=client, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
        next_id = int(_RUN_ID.search(done.stdout + done.stderr).group(1))
    finally:
        installer.down(**second)
        if mount is not None:
            mount.kill()
    lost = [run for run in finished if run not in restored]
    # The lost run wrote records all along; the newest restored record says how far the restore reached.
    window = max(0.0, ends[finished[-1]] - newest) if lost else 0.0
    return MetaflowRound(finished, restored, next_id, window, status.restored, ends, mid_snapshot, report)


def check_round(result: MetaflowRound) -> None:
    """The restored runs are the finished ones up to some point, and no id is handed out twice.

    One run more may be restored as successful: the one whose records were all written when the
    kill came, before its client process could report that it had finished.
    """
    known = [run for run in result.restored if run in result.finished]
    assert known == result.finished[:len(known)], (result.restored, result.finished)
    extra = [run for run in result.restored if run not in result.finished]
    assert len(extra) <= 1 and all(run > max(result.finished) for run in extra), (result.restored,
                                                                                  result.finished)
    assert result.next_id > max(result.finished + result.restored), (result.next_id, result.finished)


_CLIENT_VIEW = """
import json
from metaflow import Flow, namespace
namespace(None)
runs = {}
for run in Flow(%r):
    view = {"successful": run.successful, "finished": run.finished, "unreadable": []}
    if run.successful:
        for step in run:
            for task in step:
                try:
                    [artifact.data for artifact in task]
                    task.stdout
                except Exception as exc:
                    view["unreadable"].append(f"{task.pathspec}: {type(exc).__name__}: {exc}"[:300])
    runs[run.id] = view
print(json.dumps(runs))
"""


def client_view(env: dict[str, str], cwd: Path, flow: str = "TickFlow") -> dict:
    """Every run of `flow` as the Metaflow client sees it: {run id: {successful, finished, unreadable}},
    where unreadable lists the artifacts and logs of a successful run that could not be read."""
    done = subprocess.run([sys.executable, "-c", _CLIENT_VIEW % flow], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "MetaflowNotFound" in done.stderr:
        return {}
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ui_endpoint(flags: dict, wait: float = 180.0) -> tuple[str, str]:
    """The UI API's base URL through the entry point and the token, once the UI backend answers."""
    settings = resolve(flags)
    token = settings.token_file.read_text().strip()
    base = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + wait
    while requests.get(f"{base}/api/ping", headers={"x-api-key": token}, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, f"the UI backend did not answer within {wait:.0f} s"
        time.sleep(0.5)
    return f"{base}/api", token


def ui_run_status(api: str, token: str, flow: str, run: str) -> str:
    answer = requests.get(f"{api}/flows/{flow}/runs/{run}", headers={"x-api-key": token}, timeout=60)
    assert answer.status_code == 200, (run, answer.status_code, answer.text[:300])
    return answer.json()["data"]["status"]


def check_client_and_ui_agree(flags: dict, env: dict[str, str], cwd: Path, flow: str = "TickFlow") -> dict:
    """Every run the client calls successful has every artifact and log readable, and the UI's status
    of every run agrees with the client's: completed exactly when successful. Returns the client's view."""
    runs = client_view(env, cwd, flow)
    if not runs:
        return {}
    api, token = ui_endpoint(flags)
    for run, view in runs.items():
        assert not view["unreadable"], (run, view)
        status = ui_run_status(api, token, flow, run)
        assert (status == "completed") == view["successful"], (run, status, view)
    return runs
