"""The persistence driver's world: a Colab-like runtime over a Drive-like mount, and two notebooks.

A `Runtime` is one sequence's machine: MF_ROOT on a Drive-like mount (tests/drivefs.py) whose
backing folder ("Google") outlives every runtime, PGDATA and caches on local disk. `kill()` is what
Colab does when a runtime dies: every process of the stack (udocker guests, the watcher, the mount,
any `up` or `snapshot` in progress, the notebooks' flows) is SIGKILLed at once, the local disk is
wiped and the next machine mounts only what reached Google. The images stay in the shared udocker
folder (a new runtime would pull them again; that only costs time).

A `Client` is a notebook on another machine: its own HOME, connected with the connection string,
running PayloadFlow; every run id and task id it is handed goes into the ledger.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import requests

from installer import procs
from installer.objectstore import socket_path
from installer.reconcile import LOST_FIELD
from installer.services import dsn
from installer.settings import resolve

from .conftest import REPO, stack_flags
from .drivefs import DriveMount
from .flowtools import FLOWS, connect_remote, remote_env
from .helpers_soak import runtime_processes
from .torture_checks import Finished, Ledger

FLOW = "PayloadFlow"
_RUN_ID = re.compile(r"Workflow starting \(run-id (\d+)\)")
_TASK = re.compile(r"\[(\d+)/(\w+)/(\d+) \(pid \d+\)\]")


@dataclass(frozen=True)
class Drive:
    latency: float
    upload_delay: float
    reorder: float

    def __str__(self) -> str:
        return f"{self.latency:g}/{self.upload_delay:g}/{self.reorder:g}"

    @classmethod
    def parse(cls, text: str) -> Drive:
        latency, delay, reorder = (float(part) for part in text.split("/"))
        return cls(latency, delay, reorder)


@dataclass
class FlowRun:
    client: str
    run_id: int | None = None
    returncode: int | None = None
    ended: float | None = None
    output: str = ""


class Client:
    """A notebook on another machine running PayloadFlow."""

    def __init__(self, name: str, folder: Path, ledger: Ledger, finished: Finished) -> None:
        self.name, self.folder = name, folder
        # `installer connect` and the flows import this tree, whatever the installed package is.
        self.env = {**remote_env(folder / "home"), "PYTHONPATH": str(REPO)}
        self.ledger, self.finished = ledger, finished
        self.current: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.runs: list[FlowRun] = []
        self.count = 0
        self.stop = threading.Event()

    def connect(self, connection: str) -> None:
        connect_remote(connection, self.env, self.folder)

    def start(self, runs: int = 1) -> None:
        self.stop.clear()
        self.thread = threading.Thread(target=self._loop, args=(runs,), daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 600.0) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), f"{self.name}: flows still running after {timeout:.0f} s"

    def _loop(self, runs: int) -> None:
        for _ in range(runs):
            if self.stop.is_set():
                return
            self.count += 1
            run = FlowRun(f"{self.name}#{self.count}")
            self.runs.append(run)
            self.current = subprocess.Popen(
                [sys.executable, str(FLOWS / "payload_flow.py"), "--no-pylint", "run"], env=self.env,
                cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
            lines = []
            for line in self.current.stdout:
                lines.append(line)
                self._observe(run, line)
            run.returncode = self.current.wait()
            run.ended = time.time()
            run.output = "".join(lines[-40:])
            if run.returncode == 0 and run.run_id is not None:
                self.finished.ends[run.run_id] = run.ended
            if run.returncode != 0:
                return

    def _observe(self, run: FlowRun, line: str) -> None:
        found = _RUN_ID.search(line)
        if found and run.run_id is None:
            run.run_id = int(found.group(1))
            self.ledger.run(run.run_id, run.client)
        for run_id, step, task in _TASK.findall(line):
            self.ledger.task(int(task), int(run_id), step)

    def kill(self) -> None:
        proc = self.current
        if proc is not None and proc.poll() is None:
            victims = [proc.pid] + [p.pid for p in procs.descendants(proc.pid)]
            for pid in victims:
                procs.send(pid, signal.SIGKILL)
        if self.thread is not None:
            self.thread.join(60)


_UP = """
import json, sys, threading
import installer
lock = threading.Lock()
def said(event):  # services of one wave start side by side: one whole line at a time
    with lock:
        sys.stdout.write("EVENT " + json.dumps([event.step, event.message, event.seconds]) + "\\n")
        sys.stdout.flush()
try:
    status = installer.up(progress=said, **json.loads(sys.argv[1]))
except installer.StackError as exc:
    print("ERROR " + json.dumps(str(exc)), flush=True)
    sys.exit(2)
print("STATUS " + json.dumps({"running": status.running, "restored": status.restored,
                              "steps": status.steps}), flush=True)
"""


@dataclass
class UpResult:
    running: bool = False
    restored: str | None = None
    error: str | None = None
    died_at: float | None = None  # set when the runtime was killed during this `up`
    steps: list | None = None
    output: str = ""


class Runtime:
    """One sequence's machines, one after the other, over the same Drive."""

    def __init__(self, work: Path, registry: str, drive: Drive, seed: int) -> None:
        self.work, self.drive, self.seed = work, drive, seed
        self.google = work / "google"
        self.base_flags = stack_flags(work / "content" / "drive" / "MyDrive" / "metaflow-stack", registry)
        self.sockets = socket_path(Path(self.base_flags["root"])).parent
        self.machine = 0
        self.mount: DriveMount | None = None
        self.helpers: list[subprocess.Popen] = []  # `up`, `snapshot`, `restore` this driver started
        self.new_machine()

    @property
    def local(self) -> Path:
        return self.work / f"machine{self.machine}"

    @property
    def flags(self) -> dict:
        return {**self.base_flags, "pgdata_dir": str(self.local / "pgdata"), "cache_dir": str(self.local / "cache")}

    def new_machine(self) -> None:
        self.machine += 1
        self.mount = DriveMount(self.work / "content" / "drive", self.google, latency=self.drive.latency,
                                upload_delay=self.drive.upload_delay, reorder=self.drive.reorder,
                                seed=self.seed * 1000 + self.machine).start()
        (self.mount.mountpoint / "MyDrive").mkdir(exist_ok=True)
        self.local.mkdir(parents=True)

    def processes(self) -> list[int]:
        """Every process of the stack on this machine (not the mount itself)."""
        mount = self.mount.proc.pid if self.mount and self.mount.proc else None
        return [pid for pid in runtime_processes((str(self.work),)) if pid != mount]

    def kill(self, clients: list[Client]) -> float:
        """The runtime dies: everything SIGKILLed at once, local disk wiped, a new machine. Returns when.

        Everything is stopped (SIGSTOP) before anything is killed, until no new process shows up: a
        process killed first would leave its children (a guest under proot, a service `up` was
        starting) to init, where no marker finds them."""
        for client in clients:
            client.stop.set()
        died = time.time()
        frozen: list[int] = []
        for _ in range(20):
            found = runtime_processes((str(self.work),))
            roots = [proc.pid for proc in self.helpers if proc.poll() is None]
            roots += [client.current.pid for client in clients
                      if client.current is not None and client.current.poll() is None]
            found += roots + [p.pid for pid in roots for p in procs.descendants(pid)]
            new = [pid for pid in dict.fromkeys(found) if pid not in frozen and pid != os.getpid()]
            if not new:
                break
            for pid in new:
                procs.send(pid, signal.SIGSTOP)
            frozen += new
        for pid in frozen:
            procs.send(pid, signal.SIGKILL)
        for client in clients:
            client.kill()
        for proc in self.helpers:
            proc.wait(30)
        self.helpers.clear()
        procs.wait_gone(frozen, 30)
        self.mount.kill()
        shutil.rmtree(self.local, ignore_errors=True)
        shutil.rmtree(self.sockets, ignore_errors=True)  # /tmp is local disk too
        self.new_machine()
        return died

    def up_process(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _UP, json.dumps(self.flags)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        self.helpers.append(proc)
        return proc

    def up(self, kill_at: tuple[str | None, int, float] | None = None, clients: list[Client] = ()) -> UpResult:
        """`up` as a notebook cell runs it; with kill_at (step, nth "starting" line, delay) the runtime
        dies that long after that step (or the nth step of any name) started, or as `up` ends."""
        proc = self.up_process()
        result, lines, starts = UpResult(), [], 0
        for line in proc.stdout:
            lines.append(line)
            kind, _, payload = line.partition(" ")
            if kind == "EVENT":
                step, message, _seconds = json.loads(payload)
                starts += message == "starting"
                if kill_at and message == "starting" and (step == kill_at[0] if kill_at[0] else starts >= kill_at[1]):
                    time.sleep(kill_at[2])
                    break
            elif kind == "STATUS":
                status = json.loads(payload)
                result.running, result.restored, result.steps = status["running"], status["restored"], status["steps"]
            elif kind == "ERROR":
                result.error = json.loads(payload)
        if kill_at:
            result.died_at = self.kill(list(clients))
        else:
            proc.wait(600)
            self.helpers.remove(proc)
        result.output = "".join(lines[-30:])
        return result

    def background(self, code: str) -> subprocess.Popen:
        """A call of the installer's API from another process (a `snapshot` or `restore` cell)."""
        proc = subprocess.Popen([sys.executable, "-c", f"import installer, json, sys\n{code}",
                                 json.dumps(self.flags)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        self.helpers.append(proc)
        return proc

    def has_pgdata(self) -> bool:
        folder = self.local / "pgdata"
        return folder.is_dir() and any(folder.iterdir())

    def stop(self, clients: list[Client]) -> None:
        """The end of a sequence: whatever still runs is stopped, the mount released, the folder removed."""
        try:
            self.kill(clients)
        finally:
            self.mount.kill()
            shutil.rmtree(self.work, ignore_errors=True)


def take_port(port: int) -> socket.socket:
    """Another program listening on the stack's port, as when something else took it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def marked_lost(flags: dict) -> set[int]:
    """The runs the restore's reconcile marked lost (a task with the mfstack-data-lost field)."""
    settings = resolve(flags)
    password = (settings.secrets_dir / "db_password").read_text().strip()
    with psycopg.connect(dsn(settings, password)) as conn:
        rows = conn.execute("SELECT DISTINCT run_number FROM metadata_v3 WHERE field_name = %s AND flow_id = %s",
                            (LOST_FIELD, FLOW)).fetchall()
    return {int(row[0]) for row in rows}


def ui_get(api: str, token: str, path: str, wait: float = 60.0, **params: str) -> list | dict:
    """GET a UI API resource through the entry point; the UI's caches answer 202 while they fetch."""
    deadline = time.monotonic() + wait
    while True:
        answer = requests.get(f"{api}{path}", headers={"x-api-key": token}, params=params, timeout=60)
        if answer.status_code == 200:
            return answer.json()["data"]
        if answer.status_code not in (202, 500, 503) or time.monotonic() > deadline:
            raise RuntimeError(f"{path}: HTTP {answer.status_code} {answer.text[:300]}")
        time.sleep(0.2)


def ui_reads(api: str, token: str, run: str) -> dict[str, dict]:
    """Every task of a run as the UI reads it: its artifacts' content and its log."""
    base = f"/flows/{FLOW}/runs/{run}"
    tasks = [(step["step_name"], str(task["task_id"])) for step in ui_get(api, token, f"{base}/steps")
             for task in ui_get(api, token, f"{base}/steps/{step['step_name']}/tasks")]

    def read(step: str, task: str) -> dict:
        path = f"{base}/steps/{step}/tasks/{task}"
        try:
            artifacts = {a["name"]: _content(a) for a in ui_get(api, token, f"{path}/artifacts",
                                                                 postprocess="true", _limit="1000")}
            log = [] if step.startswith("_") else [
                line["line"] for line in ui_get(api, token, f"{path}/logs/out", attempt_id="0")]
            return {"artifacts": artifacts, "log": log, "error": None}
        except (RuntimeError, requests.RequestException) as exc:
            return {"artifacts": {}, "log": [], "error": str(exc)[:300]}

    with ThreadPoolExecutor(max_workers=4) as pool:  # the UI's caches fetch while others wait
        found = pool.map(lambda item: read(*item), tasks)
        return {f"{FLOW}/{run}/{step}/{task}": result for (step, task), result in zip(tasks, found)}


def _content(artifact: dict) -> str | None:
    """An artifact's content as the UI shows it. The UI shows none above 4 KB (its own limit,
    MAX_PROCESSABLE_S3_ARTIFACT_SIZE_KB): those count as readable here, the client reads them whole."""
    if "content" in artifact:
        return artifact["content"]
    if "artifact-too-large" in str(artifact.get("postprocess_error")):
        return "(above the UI's preview size)"
    return None
