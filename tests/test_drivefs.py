"""The Drive-like test file system itself: its refusals, its delayed uploads and a runtime's death."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drivefs import DriveMount, assert_refuses_like_drive


@pytest.fixture
def drive(tmp_path: Path) -> Iterator[DriveMount]:
    mount = DriveMount(tmp_path / "mnt", tmp_path / "google", latency=0.01, upload_delay=30, reorder=0).start()
    yield mount
    mount.kill()


def test_refuses_symlinks_hard_links_chmod_and_exec_like_drive(drive: DriveMount) -> None:
    root = drive.mountpoint
    assert any(line.split()[1] == str(root) and line.split()[2] == "fuse.drive" and "nosuid" in line
               and "nodev" in line for line in Path("/proc/mounts").read_text().splitlines())
    (root / "file").write_text("x")
    assert_refuses_like_drive(root / "file")
    assert os.stat(root / "file").st_uid == 0
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    with pytest.raises(PermissionError):
        subprocess.run([str(script)], check=True)
    assert drive.stats()["refused"] == {"symlink": 1, "link": 1, "chmod": 1}


def test_each_refusal_can_be_turned_off(tmp_path: Path) -> None:
    mount = DriveMount(tmp_path / "mnt", tmp_path / "google", latency=0, refuse=("link",)).start()
    try:
        (mount.mountpoint / "file").write_text("x")
        os.symlink("file", mount.mountpoint / "sym")
        os.chmod(mount.mountpoint / "file", 0o640)
        assert oct(os.stat(mount.mountpoint / "file").st_mode & 0o777) == "0o640"
        with pytest.raises(OSError):
            os.link(mount.mountpoint / "file", mount.mountpoint / "hard")
    finally:
        mount.kill()


def test_a_dead_runtime_loses_what_was_not_uploaded(drive: DriveMount) -> None:
    root = drive.mountpoint
    (root / "early").write_text("uploaded")
    drive.flush()
    assert (drive.backing / "early").read_text() == "uploaded"
    (root / "early").write_text("rewritten, never uploaded")
    (root / "sub").mkdir()
    (root / "sub" / "late").write_text("never uploaded")
    # The kernel tells the file system a file was closed (FUSE release) after close() returned.
    deadline = time.monotonic() + 10
    while drive.stats()["pending_uploads"] < 3:
        assert time.monotonic() < deadline, drive.stats()
        time.sleep(0.05)
    drive.kill()

    fresh = drive.fresh()
    try:
        assert sorted(os.listdir(fresh.mountpoint)) == ["early"]
        assert (fresh.mountpoint / "early").read_text() == "uploaded"
    finally:
        fresh.kill()


def test_uploads_of_different_files_arrive_in_any_order(tmp_path: Path) -> None:
    """A name can reach Google before its content, and a later file before an earlier one."""
    mount = DriveMount(tmp_path / "mnt", tmp_path / "google", latency=0, upload_delay=0, reorder=3,
                       seed=7).start()
    seen_out_of_order = False
    try:
        for n in range(40):
            (mount.mountpoint / f"f{n:02d}").write_text("content")
        for _ in range(300):
            names = sorted(os.listdir(mount.backing))
            numbers = [int(name[1:]) for name in names]
            empty = [name for name in names if (mount.backing / name).stat().st_size == 0]
            if numbers != list(range(len(numbers))) or empty:
                seen_out_of_order = True
            if len(names) == 40 and not empty:
                break
            time.sleep(0.02)
        mount.flush()
        assert all((mount.backing / f"f{n:02d}").read_text() == "content" for n in range(40))
    finally:
        mount.kill()
    assert seen_out_of_order
