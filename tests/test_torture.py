"""The persistence driver (scripts/torture.py) in short: one seeded sequence on a harsh Drive, and
proof that its checks can fail.

The sequence: `up`, the runtime killed 0-3 s after a run finished, `up` on the fresh runtime
(restoring from Drive), `rotate-token`, `down`, an `up` that fails on a taken port, `restore --force`
and `up` again, with every invariant checked after every event.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers_torture import Drive
from tests.torture_checks import (Finished, Ledger, check_failed_up, check_prefix, check_ui_reads,
                                  check_views)
from tests.torture_events import Figures, Sequence, parse_replay, plan, replay_string

CI_SEQUENCE = "seed=22 drive=0.1/3/2 up,kill:after,up,rotate,down,failup,restore,up"


def test_a_seeded_sequence_of_deaths_and_restores_keeps_every_invariant(tmp_path: Path, registry: str) -> None:
    seed, drive, events = parse_replay(CI_SEQUENCE)
    figures = Figures()
    lines: list[str] = []
    sequence = Sequence(tmp_path / "seq", registry, seed, drive, events, figures, lines.append)
    violations = sequence.run()
    assert violations == [], "\n".join(lines + violations)
    assert sequence.ledger.runs and sequence.ledger.tasks, "the ledger saw no id: the checks would see nothing"
    assert figures.events == len(events) and figures.kills["after"] == 1, lines
    assert figures.restores >= 2, lines  # the one of `up` on the fresh runtime, and `restore --force`
    assert figures.without_data == 0 and figures.reused == 0


def test_a_replay_string_names_the_sequence_exactly() -> None:
    import random

    events = plan(random.Random(3), 8)
    text = replay_string(41, Drive(0.15, 4.5, 0.5), events)
    assert parse_replay(text) == (41, Drive(0.15, 4.5, 0.5), events)
    assert events[0] == "up" and events[-1] in ("up", "flows", "rotate")


def test_an_id_handed_out_twice_is_a_violation() -> None:
    ledger = Ledger()
    ledger.run(7, "a#1")
    ledger.task(70, 7, "start")
    ledger.task(70, 7, "start")  # the same task seen again: no violation
    assert ledger.reused == []
    ledger.run(7, "b#1")
    ledger.task(70, 9, "start")
    assert len(ledger.reused) == 2 and "run id 7" in ledger.reused[0] and "task id 70" in ledger.reused[1]


def test_a_run_shown_successful_without_an_artifact_is_a_violation() -> None:
    ledger = Ledger()
    ledger.run(3, "a#1")
    client = {"3": {"successful": True, "finished": True,
                    "unreadable": ["PayloadFlow/3/part/12: DataException: no object"]}}
    violations, without = check_views(client, {"3": "completed"}, set(), ledger)
    assert without == 1 and "cannot be read whole" in violations[0]

    reads = {"PayloadFlow/3/part/12": {"artifacts": {"blob": None, "digest": "ab"}, "log": ["x"], "error": None},
             "PayloadFlow/3/end/13": {"artifacts": {"_task_ok": "True"}, "log": [], "error": None}}
    problems = check_ui_reads("3", reads)
    assert any("blob" in p for p in problems) and any("no log" in p for p in problems)


def test_the_ui_and_the_client_disagreeing_is_a_violation() -> None:
    ledger = Ledger()
    ledger.run(5, "a#1")
    client = {"5": {"successful": False, "finished": False, "unreadable": []}}
    violations, without = check_views(client, {"5": "completed"}, set(), ledger)
    assert without == 1 and "the UI says 'completed'" in violations[0]
    # A run the restore marked lost must not be shown finished.
    shown = {"5": {"successful": True, "finished": True, "unreadable": []}}
    violations, _ = check_views(shown, {"5": "completed"}, {5}, ledger)
    assert any("marked lost" in v for v in violations)
    # A successful run no client was ever handed.
    violations, _ = check_views({"6": {"successful": True, "finished": True, "unreadable": []}},
                                {"6": "completed"}, set(), ledger)
    assert any("no client was ever handed" in v for v in violations)


def test_restored_runs_that_are_not_a_prefix_are_a_violation() -> None:
    finished = Finished({1: 100.0, 2: 110.0, 3: 120.0})
    violations, outcome = check_prefix(finished, {1, 3}, set(), died_at=125.0)
    assert violations and "run 2" in violations[0]
    # The same hole, marked lost by the restore, is allowed; the window runs to the death.
    violations, outcome = check_prefix(finished, {1, 3}, {2}, died_at=125.0)
    assert violations == [] and outcome.marked == [2] and outcome.window_s == 15.0
    # A tail lost in the window is fine.
    violations, outcome = check_prefix(finished, {1}, set(), died_at=125.0)
    assert violations == [] and outcome.lost == [2, 3]


def test_a_failed_up_must_name_the_port_and_leave_nothing() -> None:
    assert check_failed_up("port 7860 is in use by python (pid 12)", 7860, []) == []
    assert check_failed_up(None, 7860, [])
    assert check_failed_up("something went wrong", 7860, [])
    assert check_failed_up("port 7860 is in use", 7860, ["4242"])
