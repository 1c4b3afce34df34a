"""The invariants the persistence driver (scripts/torture.py) checks after every event.

Each check takes what was observed (the ledger of ids the clients were handed, the client's and the
UI's view of the runs, what the restore marked lost) and returns violations as sentences; nothing
here starts a process, so a check can be fed a ledger or a view by hand and shown to fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Two notebooks finish runs side by side: a run's end as its client saw it trails the commit of its
# last record by the client's own wrap-up, so finishes this close together have no order to keep.
FINISH_JITTER_S = 1.0


@dataclass
class Ledger:
    """Every run id and task id a client was ever handed in one sequence, and what it was for."""

    runs: dict[int, str] = field(default_factory=dict)              # run id -> the flow invocation
    tasks: dict[int, tuple[int, str]] = field(default_factory=dict)  # task id -> (run id, step)
    reused: list[str] = field(default_factory=list)

    def run(self, run_id: int, invocation: str) -> None:
        owner = self.runs.setdefault(run_id, invocation)
        if owner != invocation:
            self.reused.append(f"run id {run_id} handed out twice: to {owner} and to {invocation}")

    def task(self, task_id: int, run_id: int, step: str) -> None:
        owner = self.tasks.setdefault(task_id, (run_id, step))
        if owner != (run_id, step):
            self.reused.append(f"task id {task_id} handed out twice: to {owner[0]}/{owner[1]} and to "
                               f"{run_id}/{step}")


@dataclass
class Finished:
    """Runs whose client reported success, with when, still expected to be in the database."""

    ends: dict[int, float] = field(default_factory=dict)  # run id -> when its client saw it finish

    def ordered(self) -> list[int]:
        return sorted(self.ends, key=lambda run: (self.ends[run], run))


@dataclass
class RestoreOutcome:
    lost: list[int]        # finished runs the restored database does not show as successful
    marked: list[int]      # of those, the ones the reconcile marked lost (shown unfinished)
    window_s: float | None  # from the earliest lost finish to the death (None: nothing lost)


def check_prefix(finished: Finished, successful: set[int], marked: set[int], died_at: float | None
                 ) -> tuple[list[str], RestoreOutcome]:
    """The runs still shown successful are the finished ones up to some point: a finished run may be
    missing only if every run shown after it finished within FINISH_JITTER_S of it, or if the restore
    marked it lost (a hole the user sees as not finished)."""
    violations = []
    order = finished.ordered()
    missing = [run for run in order if run not in successful]
    gone = [run for run in missing if run not in marked]
    for run in gone:
        later = [kept for kept in order if kept in successful
                 and finished.ends[kept] > finished.ends[run] + FINISH_JITTER_S]
        if later:
            violations.append(f"run {run} finished and is gone, but runs that finished after it are shown "
                              f"successful: {later[:5]} (restored runs are not a prefix of finished ones)")
    window = None
    if missing and died_at is not None:
        window = max(0.0, died_at - min(finished.ends[run] for run in missing))
    return violations, RestoreOutcome(missing, [run for run in missing if run in marked], window)


def check_views(client: dict[str, dict], ui_status: dict[str, str], marked: set[int], ledger: Ledger
                ) -> tuple[list[str], int]:
    """The client's and the UI's view of every run. Returns the violations and how many runs are
    shown finished without their data (a successful run with something unreadable, or a run the UI
    calls completed that the client does not call successful)."""
    violations, without_data = [], 0
    for run, view in sorted(client.items(), key=lambda item: int(item[0])):
        if view["successful"] and view.get("unreadable"):
            without_data += 1
            violations.append(f"run {run} is shown successful but cannot be read whole: {view['unreadable'][:3]}")
        status = ui_status.get(run)
        if status is None:
            violations.append(f"run {run} is listed by the client but not by the UI")
        elif (status == "completed") != bool(view["successful"]):
            without_data += status == "completed"
            violations.append(f"run {run}: the UI says {status!r}, the client says successful="
                              f"{view['successful']}")
        if int(run) in marked and (view["successful"] or view["finished"]):
            without_data += 1
            violations.append(f"run {run} was marked lost at the restore but the client shows it finished")
        if view["successful"] and int(run) not in ledger.runs:
            violations.append(f"run {run} is shown successful but no client was ever handed its id")
    return violations, without_data


def check_ui_reads(run: str, tasks: dict[str, dict]) -> list[str]:
    """What the UI API gave for every task of a successful run: {pathspec: {artifacts: {name: content},
    log: [lines], error: str | None}}; every artifact must have content and every task a log."""
    violations = []
    for pathspec, read in sorted(tasks.items()):
        if pathspec.split("/")[2].startswith("_"):  # _parameters: nothing of the run's own
            continue
        if read.get("error"):
            violations.append(f"run {run}: the UI could not read {pathspec}: {read['error']}")
            continue
        empty = sorted(name for name, content in read["artifacts"].items() if content is None)
        if empty or not read["artifacts"]:
            violations.append(f"run {run}: the UI gives no content for {pathspec}'s artifacts {empty or 'all'}")
        if not read["log"]:
            violations.append(f"run {run}: the UI gives no log for {pathspec}")
    return violations


def check_failed_up(error: str | None, port: int, leftovers: list[str]) -> list[str]:
    """A failed `up` said why (the taken port) and left nothing of the stack running."""
    violations = []
    if error is None:
        violations.append(f"`up` succeeded although port {port} was taken")
    elif str(port) not in error:
        violations.append(f"`up` failed without naming the taken port {port}: {error[:300]}")
    if leftovers:
        violations.append(f"a failed `up` left processes running: {leftovers[:5]}")
    return violations
