"""The whole stack with MF_ROOT on the Drive-like mount: it starts under each of Drive's refusals
(symlinks, hard links, chmod/exec), and a new runtime restores what reached "Google"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import installer
from installer.settings import resolve
from installer.stack import dsn
from tests.drivefs import DriveMount, assert_refuses_like_drive


@pytest.fixture
def drive(tmp_path: Path) -> Iterator[DriveMount]:
    mount = DriveMount(tmp_path / "content" / "drive", tmp_path / "google", latency=0.05, upload_delay=1,
                       reorder=1).start()
    yield mount
    mount.kill()


def test_stack_starts_with_mf_root_on_drive_under_every_refusal(drive: DriveMount, stack: dict,
                                                                 tmp_path: Path) -> None:
    root = drive.mountpoint / "MyDrive" / "metaflow-stack"
    root.parent.mkdir()
    stack.update(root=str(root), pgdata_dir=str(tmp_path / "local" / "pgdata"),
                 cache_dir=str(tmp_path / "local" / "cache"))
    up = installer.up(wait_ui=True, **stack)
    assert up.running and all(s.healthy for s in up.services), up

    # Each refusal is in force on this very mount, and the stack started anyway.
    assert_refuses_like_drive(root / "connection.json")
    refused = drive.stats()["refused"]
    assert refused.get("symlink", 0) >= 1 and refused.get("link", 0) >= 1 and refused.get("chmod", 0) >= 1

    # Nothing the stack needs to run lives on Drive: no sockets, no programs, no locks there.
    kinds = {path.suffix for path in root.rglob("*") if path.is_file()}
    assert not {".sock", ".lock"} & kinds, kinds

    settings = resolve(stack)
    password = (settings.secrets_dir / "db_password").read_text().strip()
    with psycopg.connect(dsn(settings, password)) as conn:
        conn.execute("CREATE TABLE drive_probe (id bigserial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO drive_probe (note) VALUES ('before the stop')")
    installer.down(**stack)
    drive.flush()  # the notebook's Stop button: drive.flush_and_unmount()
    assert not installer.status(**stack).running
