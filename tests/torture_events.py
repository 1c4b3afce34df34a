"""The persistence driver's events, drawn from a model of the stack, and one sequence of them.

A sequence is planned up front from its seed (so its replay string names every event): the model
knows only whether the stack runs, which decides the events that make sense next. Each event is
then applied to a real runtime (tests/helpers_torture.py) and followed by every invariant check
(tests/torture_checks.py) the stack's state allows.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import installer
from installer.settings import resolve

from .helpers_soak import amcheck_stack, client_view, ui_endpoint, ui_run_status
from .helpers_torture import FLOW, Client, Drive, Runtime, take_port, ui_reads, marked_lost
from .torture_checks import Finished, Ledger, check_failed_up, check_prefix, check_ui_reads, check_views

# Events when the stack runs, and when it does not, with how often each is drawn.
WHEN_RUNNING = {"flows": 1.2, "kill:load": 1.5, "kill:after": 1.5, "kill:idle": 0.9, "kill:snapshot": 1.0,
                "down": 0.3, "rotate": 0.3}
WHEN_STOPPED = {"up": 5.0, "kill:up": 1.0, "kill:restore": 1.0, "failup": 0.6, "restore": 0.3}
EVENTS = ("up", *WHEN_RUNNING, *[name for name in WHEN_STOPPED if name != "up"])
RUNNING_AFTER = {"up", "flows", "rotate"}
REVERIFY_S = 60.0  # runs that finished this close to a death are read through the UI again after it


def plan(rng: random.Random, events: int) -> list[str]:
    """`events` events starting with `up`; one more `up` at the end if the last left the stack down,
    so that every death is followed by a restore and its checks."""
    planned, running = ["up"], True
    while len(planned) < events:
        table = WHEN_RUNNING if running else WHEN_STOPPED
        event = rng.choices(list(table), weights=list(table.values()))[0]
        planned.append(event)
        running = event in RUNNING_AFTER
    if not running:
        planned.append("up")
    return planned


def replay_string(seed: int, drive: Drive, events: list[str]) -> str:
    return f"seed={seed} drive={drive} {','.join(events)}"


def parse_replay(text: str) -> tuple[int, Drive, list[str]]:
    parts = dict(part.split("=", 1) for part in text.split() if "=" in part)
    events = next(part for part in text.split() if "=" not in part).split(",")
    unknown = [event for event in events if event not in EVENTS]
    if unknown or "seed" not in parts or "drive" not in parts:
        raise ValueError(f"not a replay string (seed=N drive=L/D/R event,event,...): {text!r}")
    return int(parts["seed"]), Drive.parse(parts["drive"]), events


def draw_drive(rng: random.Random) -> Drive:
    """Drive settings for one sequence: up to 0.2 s per operation, uploads up to 5 s late, reordered
    by up to 5 s more."""
    return Drive(round(rng.uniform(0.0, 0.2), 2), round(rng.uniform(0.0, 5.0), 1), round(rng.uniform(0.0, 5.0), 1))


@dataclass
class Figures:
    sequences: int = 0
    events: int = 0
    kills: Counter = field(default_factory=Counter)
    mid_snapshot: int = 0
    restores: int = 0
    runs_finished: int = 0
    lost: int = 0
    marked: int = 0
    windows: list[float] = field(default_factory=list)
    without_data: int = 0
    reused: int = 0
    violations: list[str] = field(default_factory=list)


class Sequence:
    """One seeded sequence of events on its own runtime and Drive."""

    def __init__(self, work: Path, registry: str, seed: int, drive: Drive, events: list[str], figures: Figures,
                 say=print) -> None:  # type: ignore[no-untyped-def]
        self.seed, self.drive, self.events, self.figures, self.say = seed, drive, events, figures, say
        self.rng = random.Random(seed)
        self.ledger, self.finished = Ledger(), Finished()
        self.runtime = Runtime(work, registry, drive, seed)
        self.clients = [Client(name, work / f"client-{name}", self.ledger, self.finished) for name in "ab"]
        self.running = False
        self.died_at: float | None = None
        self.verified: set[str] = set()
        self.reported_reuse = 0

    def run(self) -> list[str]:
        """Every event and its checks; stops at the first event with violations, which it returns."""
        try:
            for number, event in enumerate(self.events, 1):
                began = time.monotonic()
                try:
                    violations = self.apply(event)
                    violations += self.check()
                except Exception as exc:  # an event that cannot even run is a finding too
                    violations = [f"{event}: {type(exc).__name__}: {str(exc)[:1500]}"]
                self.figures.events += 1
                self.say(f"  {number}. {event:<14} {time.monotonic() - began:6.1f} s"
                         f"{'  VIOLATIONS: ' + ' | '.join(violations) if violations else ''}")
                if violations:
                    replay = replay_string(self.seed, self.drive, self.events[:number])
                    return [f"{violation} [--replay '{replay}']" for violation in violations]
            return []
        finally:
            self.figures.sequences += 1
            self.figures.runs_finished += sum(run.returncode == 0 for client in self.clients for run in client.runs)
            self.runtime.stop(self.clients)

    # --- events ----------------------------------------------------------------------------

    def apply(self, event: str) -> list[str]:
        kind, _, how = event.partition(":")
        if kind == "kill":
            return self._kill(how)
        return getattr(self, f"_{kind}")()

    def _up(self) -> list[str]:
        result = self.runtime.up()
        if result.error or not result.running:
            return [f"`up` failed: {result.error or result.output[-1500:]}"]
        self.running = True
        self.figures.restores += bool(result.restored)
        self._connect()
        return []

    def _connect(self) -> None:
        connection = installer.connection(**self.runtime.flags)
        for client in self.clients:
            client.connect(connection)

    def _flows(self, runs: int = 1) -> list[str]:
        for client in self.clients:
            client.start(runs)
        for client in self.clients:
            client.wait()
        return [f"a run failed on a healthy stack ({run.client}, run id {run.run_id}): {run.output[-1500:]}"
                for client in self.clients for run in client.runs[-runs:] if run.returncode != 0]

    def _kill(self, how: str) -> list[str]:
        rng, runtime = self.rng, self.runtime
        if how == "idle":
            time.sleep(rng.uniform(0.0, 2.0))
        elif how == "load":
            for client in self.clients:
                client.start(3)
            time.sleep(rng.uniform(1.0, 15.0))
        elif how == "after":
            seen = len(self.finished.ends)
            for client in self.clients:
                client.start(3)
            deadline = time.monotonic() + 300
            while len(self.finished.ends) == seen and time.monotonic() < deadline:
                if not any(client.thread.is_alive() for client in self.clients):
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 3.0))
        elif how == "snapshot":
            snap = runtime.background("installer.snapshot(**json.loads(sys.argv[1]))")
            time.sleep(rng.uniform(0.2, 3.0))
            self.figures.mid_snapshot += snap.poll() is None
        elif how == "up":
            return self._died(how, runtime.up(kill_at=(None, rng.randint(2, 9), rng.uniform(0.0, 2.0)),
                                              clients=self.clients).died_at)
        elif how == "restore":
            if runtime.has_pgdata():  # a `restore --force` cell, killed
                runtime.background("installer.restore(force=True, **json.loads(sys.argv[1]))")
                time.sleep(rng.uniform(0.1, 3.0))
            else:  # the restore inside `up` on a fresh runtime
                return self._died(how, runtime.up(kill_at=("restore", 0, rng.uniform(0.0, 2.0)),
                                                  clients=self.clients).died_at)
        return self._died(how, runtime.kill(self.clients))

    def _died(self, how: str, died_at: float | None) -> list[str]:
        if self.died_at is None:  # the data was lost at the first death since the last check
            self.died_at = died_at
        self.running = False
        self.figures.kills[how] += 1
        return []

    def _failup(self) -> list[str]:
        settings = resolve(self.runtime.flags)
        port = self.rng.choice([settings.port, settings.metadata_port, settings.db_port])
        holder = take_port(port)
        error = None
        try:
            installer.up(**self.runtime.flags)
        except Exception as exc:
            error = str(exc)
        finally:
            holder.close()
        left = [f"{pid}" for pid in self.runtime.processes()]
        if error is None:
            self.running = True
        return check_failed_up(error, port, left)

    def _down(self) -> list[str]:
        installer.down(**self.runtime.flags)
        self.running = False
        left = self.runtime.processes()
        return [f"`down` left processes running: {left[:5]}"] if left else []

    def _restore(self) -> list[str]:
        try:
            installer.restore(force=True, **self.runtime.flags)
        except installer.StackError as exc:
            if "no snapshot" in str(exc).lower() or "nothing to restore" in str(exc).lower():
                return []
            return [f"`restore --force` failed: {exc}"]
        self.figures.restores += 1
        return []

    def _rotate(self) -> list[str]:
        installer.rotate_token(**self.runtime.flags)
        self._connect()
        return []

    # --- checks ----------------------------------------------------------------------------

    def check(self) -> list[str]:
        violations = [reuse for reuse in self.ledger.reused[self.reported_reuse:]]
        self.figures.reused += len(violations)
        self.reported_reuse = len(self.ledger.reused)
        if self.running:
            violations += self._check_running()
        return violations

    def _check_running(self) -> list[str]:
        flags = self.runtime.flags
        violations = []
        try:
            amcheck_stack(flags)
        except AssertionError as exc:
            violations.append(str(exc)[:1500])
        marked = marked_lost(flags)
        view = client_view(self.clients[0].env, self.clients[0].folder, FLOW)
        successful = {int(run) for run, seen in view.items() if seen["successful"]}
        found, outcome = check_prefix(self.finished, successful, marked, self.died_at)
        violations += found
        if outcome.lost and self.died_at is None:
            violations.append(f"finished runs {outcome.lost} vanished although the runtime never died")
        self.figures.lost += len(outcome.lost) - len(outcome.marked)
        self.figures.marked += len(outcome.marked)
        if outcome.window_s is not None:
            self.figures.windows.append(outcome.window_s)
        for run in outcome.lost:
            del self.finished.ends[run]
        for run in successful - set(self.finished.ends):  # finished as the runtime died, before its client knew
            if run in self.ledger.runs:
                self.finished.ends[run] = self.died_at or time.time()
        if self.died_at is not None:
            self.verified -= {str(run) for run, end in self.finished.ends.items() if end > self.died_at - REVERIFY_S}
        self.died_at = None
        api, token = ui_endpoint(flags)
        statuses = {run: ui_run_status(api, token, FLOW, run) for run in view}
        found, without = check_views(view, statuses, marked, self.ledger)
        violations += found
        for run in sorted(str(run) for run in successful if str(run) not in self.verified):
            began = time.monotonic()
            problems = check_ui_reads(run, ui_reads(api, token, run))
            violations += problems
            without += bool(problems)
            self.verified.add(run)
            self.say(f"     UI read run {run} in {time.monotonic() - began:.1f} s")
        self.figures.without_data += without
        return violations

