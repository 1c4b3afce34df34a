"""Faults: everything killed at a random instant under steady writes, and a drive that fills up."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer import procs
from installer.errors import SnapshotError
from installer.snapshot import list_generations, read_status, take_snapshot
from tests.helpers_pg import PgCluster, crash_round, start_watcher, wait_for

ROUNDS = int(os.environ.get("MF_TEST_CRASH_ROUNDS", "3"))


def test_kill_everything_at_a_random_instant_then_restore(workdir: Path) -> None:
    seed = int(os.environ.get("MF_TEST_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    for number in range(1, ROUNDS + 1):
        result = crash_round(workdir, rng)  # raises on amcheck failures, gaps or phantom rows
        assert result.generations_published >= 1
        assert result.skipped == [], f"round {number} (seed {seed}): {result.skipped}"
        assert 0 <= result.restored <= result.committed + 1, f"round {number} (seed {seed}): {result}"


def test_kill_everything_with_snapshots_on_a_drive_like_mount(workdir: Path) -> None:
    """Drive's rules: 50 ms per operation, uploads delayed and reordered, lost with the runtime."""
    seed = int(os.environ.get("MF_TEST_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    for number in range(1, ROUNDS + 1):
        result = crash_round(workdir, rng, max_wait=4, drive={"latency": 0.05, "upload_delay": 0.5,
                                                            "reorder": 0.5})
        assert result.generations_published >= 1, f"round {number} (seed {seed})"
        assert 0 <= result.restored <= result.committed + 1, f"round {number} (seed {seed}): {result}"


@pytest.fixture
def small_drive(workdir: Path) -> Iterator[Path]:
    """A 20 MB file system: a drive that fills up. Fails (never skips) if it cannot be mounted."""
    mount = workdir / "drive"
    mount.mkdir()
    procs.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], what="mount a 20 MB tmpfs",
              hint="this test needs root to mount a small file system")
    try:
        yield mount
    finally:
        procs.run(["umount", "-l", str(mount)], what="umount the 20 MB tmpfs", check=False)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_drive_keeps_the_previous_generation_and_is_retried(workdir: Path, small_drive: Path) -> None:
    pg = PgCluster.initdb(workdir / "pgdata")
    pg.start()
    watcher = None
    try:
        first = take_snapshot(pg.dsn, pg.datadir, small_drive)
        used_after_first = used_bytes(small_drive)
        with pg.connect() as conn:  # ~24 MB nothing can compress
            conn.execute("CREATE TABLE big (id int, payload bytea)")
            conn.execute("ALTER TABLE big ALTER payload SET STORAGE EXTERNAL")
            for item in range(24):
                conn.execute("INSERT INTO big VALUES (%s, %s)", (item, os.urandom(1 << 20)))

        with pytest.raises(SnapshotError, match="is full") as caught:
            take_snapshot(pg.dsn, pg.datadir, small_drive)
        assert "previous snapshot is intact" in str(caught.value)
        listed = list_generations(small_drive, deep=True)
        assert [(info.id, info.ok) for info in listed] == [(first.id, True)]
        assert list((small_drive / "tmp").iterdir()) == []
        assert used_bytes(small_drive) <= used_after_first + 64 * 1024  # the failed attempt's chunks are gone

        status_file = workdir / "status.json"
        watcher = start_watcher(pg.datadir, small_drive, pg.dsn, status_file, workdir / "watcher.log",
                                debounce=0.5, max_delay=1)
        failing = wait_for(lambda: (s := read_status(status_file)) and s.failures > 0 and s, 60,
                           "the watcher to record the full drive")
        assert failing.state == "failing" and "is full" in failing.last_error
        assert failing.last_error_at is not None and failing.snapshots == 0

        with pg.connect() as conn:
            conn.execute("DROP TABLE big")
        recovered = wait_for(lambda: (s := read_status(status_file)) and s.snapshots > 0 and s, 120,
                             "the watcher to retry once there is room again")
        assert recovered.last_error is None and recovered.last_id == list_generations(small_drive)[0].id
        assert all(info.ok for info in list_generations(small_drive, deep=True))
    finally:
        if watcher is not None:
            procs.kill_tree([watcher])
        pg.stop()


def test_a_stack_killed_during_real_runs_restores_a_prefix_of_them(tmp_path: Path, registry: str) -> None:
    """The whole stack and a client running flows, SIGKILLed at once; a new machine restores."""
    from .conftest import stack_flags
    from .helpers_soak import check_round, metaflow_round

    flags = stack_flags(tmp_path / "drive" / "metaflow-stack", registry)
    result = metaflow_round(tmp_path, flags, random.Random(7), min_runs=2, max_wait=6.0)
    check_round(result)
    assert len(result.finished) >= 2
    assert "restored the database from snapshot" in result.restore_note


def test_a_stack_on_drive_killed_during_real_runs_and_snapshots_restores_from_what_was_uploaded(
        tmp_path: Path, registry: str) -> None:
    """MF_ROOT on the Drive-like mount (50 ms per operation, uploads 1 s + 0..1 s late, reordered);
    the mount dies with the stack, mid-way through a snapshot taken from another process."""
    from .conftest import stack_flags
    from .helpers_soak import check_round, metaflow_round

    flags = stack_flags(tmp_path / "unused", registry)
    result = metaflow_round(tmp_path, flags, random.Random(11), min_runs=2, max_wait=4.0,
                            drive={"latency": 0.05, "upload_delay": 1.0, "reorder": 1.0},
                            snapshot_every=(0.5, 1.5))
    check_round(result)
    assert len(result.finished) >= 2 and "restored the database from snapshot" in result.restore_note
    assert result.loss_window_s <= 4.0, result


def test_a_run_killed_0_to_3_s_after_it_finished_on_a_slow_drive_is_whole_or_not_shown_finished(
        tmp_path: Path, registry: str) -> None:
    """Uploads 3 s late: the runtime dies while the newest run's rows and files are on their way, in
    any order. After the restore, a run the client calls successful has every artifact and log, and
    the UI says "completed" of exactly those runs."""
    from .conftest import stack_flags
    from .helpers_soak import check_client_and_ui_agree, check_round, metaflow_round

    flags = stack_flags(tmp_path / "unused", registry)
    seen: dict = {}

    def inspect(restored: dict, env: dict, cwd: Path) -> None:
        seen.update(check_client_and_ui_agree(restored, env, cwd))

    result = metaflow_round(tmp_path, flags, random.Random(23), min_runs=2, after_run=3.0, inspect=inspect,
                            drive={"latency": 0.1, "upload_delay": 3.0, "reorder": 1.0})
    check_round(result)
    assert seen, "the client listed no run after the restore"
