"""No id is handed out twice across restores, whatever the runtimes in between did (real PostgreSQL 15).

Each restored runtime here is a real server started on a restored copy; "dies" means it is stopped
and nothing it did after its restore reaches the snapshot folder, as when a Colab runtime dies
before its uploads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer.snapshot import take_snapshot
from installer.snapshot.sequences import STEPS, target_value
from tests.helpers_pg import PgCluster, running_cluster, start_restored

RUNS = "runs_run_number_seq"    # integer, like Metaflow's run numbers
TASKS = "tasks_task_id_seq"     # bigint, like task ids, metadata and artifact rows


@pytest.fixture
def pg(workdir: Path) -> Iterator[PgCluster]:
    with running_cluster(workdir / "pgdata", "CREATE TABLE runs (run_number serial PRIMARY KEY)",
                         "CREATE TABLE tasks (task_id bigserial PRIMARY KEY)") as cluster:
        yield cluster


def hand_out(cluster: PgCluster, runs: int, tasks: int) -> tuple[list[int], list[int]]:
    """Ids a runtime gives to new runs and tasks (inserted, as the metadata service does)."""
    with cluster.connect() as conn:
        run_ids = [conn.execute("INSERT INTO runs DEFAULT VALUES RETURNING run_number").fetchone()[0]
                   for _ in range(runs)]
        task_ids = [conn.execute("INSERT INTO tasks DEFAULT VALUES RETURNING task_id").fetchone()[0]
                    for _ in range(tasks)]
    return run_ids, task_ids


def test_the_jump_grows_with_the_time_since_the_restored_point() -> None:
    for data_type, step in STEPS.items():
        assert target_value(100, data_type, 0) == 100 + step.gap
        assert target_value(100, data_type, 10) == 100 + step.gap + 10 * step.per_second
        assert target_value(100, data_type, -50) == target_value(100, data_type, 0)  # a clock behind: no less
    assert target_value(100, "integer", 10.5) > target_value(100, "integer", 10)


def test_a_restore_after_a_restored_runtime_that_handed_out_nothing_never_goes_back(
        pg: PgCluster, dest: Path, workdir: Path) -> None:
    """The case seen: pg_sequences.last_value is NULL after the advance's setval(..., false), so the
    next restore read the start value and handed out ids that runs already held (HTTP 409s)."""
    earlier_runs, earlier_tasks = hand_out(pg, 3, 30)
    take_snapshot(pg.dsn, pg.datadir, dest)
    pg.stop()

    first, _ = start_restored(workdir, dest, "first")
    try:
        later_runs, later_tasks = hand_out(first, 2, 20)  # runs made on the first restored runtime
        take_snapshot(first.dsn, first.datadir, dest)
    finally:
        first.stop()
    second, _ = start_restored(workdir, dest, "second")  # advances, then dies before handing out any id
    try:
        take_snapshot(second.dsn, second.datadir, dest)  # ... after its advanced sequences reached Drive
    finally:
        second.stop()

    third, _ = start_restored(workdir, dest, "third")
    try:
        new_runs, new_tasks = hand_out(third, 2, 20)
    finally:
        third.stop()
    assert min(new_runs) > max(earlier_runs + later_runs)
    assert min(new_tasks) > max(earlier_tasks + later_tasks)


def test_ids_of_a_runtime_whose_advance_never_reached_drive_are_not_handed_out_again(
        pg: PgCluster, dest: Path, workdir: Path) -> None:
    """A restored runtime hands out ids and dies before any of its WAL is uploaded: the next runtime
    restores the very same point, and must still start above everything the first one gave out."""
    hand_out(pg, 3, 30)
    take_snapshot(pg.dsn, pg.datadir, dest)
    pg.stop()
    now = time.time()

    lost, _ = start_restored(workdir, dest, "lost", now=now)
    try:
        # A busy start: 5 runs and 500 tasks in its first seconds; nothing of it is snapshotted.
        lost_runs, lost_tasks = hand_out(lost, 5, 500)
    finally:
        lost.stop()

    # The next runtime restores the same point some seconds later (a new Colab runtime takes minutes).
    again, report = start_restored(workdir, dest, "again", now=now + 10)
    try:
        new_runs, new_tasks = hand_out(again, 3, 30)
    finally:
        again.stop()
    assert report.wal_pieces == 0
    assert min(new_runs) > max(lost_runs), (lost_runs, new_runs)
    assert min(new_tasks) > max(lost_tasks), (lost_tasks[-3:], new_tasks[:3])


def test_restoring_the_same_point_twice_at_the_same_instant_would_collide(
        pg: PgCluster, dest: Path, workdir: Path) -> None:
    """The clock is what separates the two: without time between them, the two restores agree (this
    is why the scheme needs it, and why the test above is not vacuous)."""
    hand_out(pg, 1, 1)
    take_snapshot(pg.dsn, pg.datadir, dest)
    pg.stop()
    now = time.time()
    firsts = []
    for name in ("one", "two"):
        cluster, _ = start_restored(workdir, dest, name, now=now)
        try:
            firsts.append(hand_out(cluster, 1, 1))
        finally:
            cluster.stop()
    assert firsts[0] == firsts[1]
