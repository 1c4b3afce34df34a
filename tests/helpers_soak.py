"""One crash round of the whole stack with real Metaflow runs as the write load.

A stack comes up (production images from the local registry), a client connected from another
HOME runs TickFlow over and over, and at a random instant every process of the stack and the
client is SIGKILLed, as when a runtime dies. A new "machine" (an empty PGDATA, the same MF_ROOT
and snapshot folder) then starts the stack, which restores the newest good snapshot. Checked:
the runs the client lists as successful are exactly the finished runs up to some point (a prefix),
and the next run gets an id no earlier run had.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import installer
from installer import procs

from .flowtools import FLOWS, connect_remote, remote_env

_RUN_ID = re.compile(r"Workflow starting \(run-id (\d+)\)")


@dataclass
class MetaflowRound:
    finished: list[int]  # run ids that finished successfully before the kill, in order
    restored: list[int]  # successful run ids the client lists after the restore
    next_id: int  # the id of the first run after the restore
    loss_window_s: float  # last finished run's end minus the end of the newest restored one (0: none lost)
    restore_note: str
    ends: dict[int, float] = field(default_factory=dict)


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


def _stack_processes(markers: tuple[str, ...]) -> list[int]:
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


def metaflow_round(work: Path, flags: dict, rng: random.Random, *, min_runs: int = 1,
                   max_wait: float = 20.0) -> MetaflowRound:
    """Up, runs, SIGKILL at a random instant after `min_runs` finished runs, restore on a new PGDATA, check."""
    first = {**flags, "pgdata_dir": str(work / "machine1-pgdata")}
    assert installer.up(**first).running
    client = work / "client"
    env = remote_env(client / "home")
    connect_remote(installer.connection(**first), env, client)
    runner = _Runner(env, client)
    runner.start()
    deadline = time.monotonic() + 300
    while len(runner.finished) < min_runs:
        assert time.monotonic() < deadline and runner.is_alive(), "no run finished within 300 s"
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, max_wait))
    # The runtime dies: the stack, the client and its flow, all at once.
    runner.stop.set()
    victims = _stack_processes((flags["root"], str(work / "machine1-pgdata")))
    if runner.current is not None and runner.current.poll() is None:
        victims += [runner.current.pid] + [p.pid for p in procs.descendants(runner.current.pid)]
    for pid in victims:
        procs.send(pid, signal.SIGKILL)
    runner.join(timeout=60)
    procs.wait_gone(victims, 30)
    finished, ends = list(runner.finished), dict(runner.ends)

    second = {**flags, "pgdata_dir": str(work / "machine2-pgdata")}
    try:
        status = installer.up(**second)
        assert status.running and status.restored, status
        restored = _successful_runs(env, client)
        done = subprocess.run([sys.executable, str(FLOWS / "tick_flow.py"), "--no-pylint", "run"], env=env,
                              cwd=client, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
        next_id = int(_RUN_ID.search(done.stdout + done.stderr).group(1))
    finally:
        installer.down(**second)
    lost = [run for run in finished if run not in restored]
    window = (ends[finished[-1]] - max((ends[r] for r in restored if r in ends), default=ends[finished[0]])
              if lost else 0.0)
    return MetaflowRound(finished, restored, next_id, window, status.restored, ends)


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
