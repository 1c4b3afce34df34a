"""Bad input and faults during `up`: each ends in a clear error, and nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import installer
from installer import runtime, stack
from installer.errors import (ConfigError, ImageError, PortInUse, RuntimeUnavailable, ServiceFailed,
                              StackError)
from installer.settings import resolve

from .conftest import free_port
from .helpers_firstrun import assert_nothing_runs, port_holder, saved_settings, small_disk


def test_port_taken_names_the_holder(stack: dict) -> None:
    with port_holder(int(stack["metadata_port"])) as holder:
        with pytest.raises(PortInUse) as caught:
            installer.up(**stack)
        message = str(caught.value)
        assert f"port {stack['metadata_port']}, needed by the metadata service, is already taken by pid {holder.pid}" \
            in message and "http.server" in message
        assert "--metadata-port (MF_METADATA_PORT)" in message
        assert "nothing was started" in message
        assert_nothing_runs(stack)
    assert installer.up(**stack).running


def test_registry_down(tmp_path: Path) -> None:
    flags = {"root": str(tmp_path / "root"), "udocker_dir": str(tmp_path / "ud"),
             "registry": f"http://127.0.0.1:{free_port()}"}
    with pytest.raises(ImageError) as caught:
        installer.up(**flags)
    assert "is not answering" in str(caught.value)
    assert "local_registry.sh start" in str(caught.value)


def test_image_missing(tmp_path: Path, registry: str) -> None:
    flags = {"root": str(tmp_path / "root"), "udocker_dir": str(tmp_path / "ud"), "registry": registry,
             "postgres_image": "mfstack/no-such-image:1"}
    with pytest.raises(ImageError) as caught:
        installer.up(**flags)
    assert "mfstack/no-such-image:1" in str(caught.value)
    assert "build_images.sh" in str(caught.value)


def test_no_container_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No udocker engine can be installed offline, and no system proot is found.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    monkeypatch.setattr(runtime, "SYSTEM_PROOT", str(tmp_path / "no-proot"))
    with pytest.raises(RuntimeUnavailable) as caught:
        runtime.prepare(tmp_path / "ud", tmp_path / "bin", lambda _: None)
    assert "apt-get install -y proot" in str(caught.value)


def test_broken_engine_fails_with_log_tail(stack: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken-proot"
    broken.write_text("#!/bin/sh\necho 'proot: cannot run this container' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("UDOCKER_USE_PROOT_EXECUTABLE", str(broken))
    with pytest.raises(ServiceFailed) as caught:
        installer.up(**stack)
    assert "PostgreSQL exited during start-up" in str(caught.value)
    assert caught.value.log == resolve(stack).log_path("postgres")


def test_disk_full(stack: dict, tmp_path: Path) -> None:
    with small_disk(tmp_path / "small") as small:
        with pytest.raises(StackError) as caught:
            installer.up(**{**stack, "udocker_dir": str(small / "udocker")})
        assert "not enough free disk space for pulling images" in str(caught.value)
        assert "--udocker-dir (UDOCKER_DIR)" in str(caught.value)


def test_root_not_writable(tmp_path: Path) -> None:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=True)
    try:
        with pytest.raises(ConfigError) as caught:
            installer.up(root=str(readonly / "stack"), udocker_dir=str(tmp_path / "ud"))
        assert str(readonly / "stack") in str(caught.value)
        assert "MF_ROOT" in str(caught.value)
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def test_service_dying_at_start_shows_its_log(stack: dict) -> None:
    settings = resolve(stack)
    settings.pgdata_dir.mkdir(parents=True)
    (settings.pgdata_dir / "PG_VERSION").write_text("9\n")
    with pytest.raises(ServiceFailed) as caught:
        installer.up(**stack)
    message = str(caught.value)
    assert "PostgreSQL exited during start-up" in message
    assert "last lines of" in message and "postgres.log" in message
    assert "could not access the server configuration file" in message
    # What started beside it is stopped again, and nothing is saved.
    assert "nothing of this stack is running; no setting was saved." in message
    assert_nothing_runs(stack)
    assert saved_settings(stack) is None
    # Nothing was lost: the data folder is left as it was for inspection.
    assert (settings.pgdata_dir / "PG_VERSION").read_text() == "9\n"
    (settings.pgdata_dir / "PG_VERSION").unlink()
    assert installer.up(**stack).running


def test_second_up_while_first_is_working(stack: dict) -> None:
    settings = resolve(stack)
    with stack_lock(settings):
        done = subprocess.run([sys.executable, "-m", "installer", "up", "--root", stack["root"]],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(installer.__file__).parent.parent)})
    assert done.returncode == 1
    assert "another command is already working on this stack" in done.stderr
    assert "`test`" in done.stderr


def test_bad_port_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(environ={"MF_PORT": "seventy"})
    assert "MF_PORT" in str(caught.value)


def stack_lock(settings):
    return stack._lock(settings, "test")


def test_status_json_from_the_command_line(stack: dict) -> None:
    installer.up(wait_ui=True, **stack)
    done = subprocess.run([sys.executable, "-m", "installer", "status", "--json", "--root", stack["root"],
                           "--port", stack["port"], "--db-port", stack["db_port"],
                           "--metadata-port", stack["metadata_port"], "--ui-port", stack["ui_port"],
                           "--udocker-dir", stack["udocker_dir"]],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import json

    data = json.loads(done.stdout)
    assert data["running"] is True
    assert data["schema_version"] > 0
    assert {s["name"]: s["healthy"] for s in data["services"]} == {
        "postgres": True, "metadata": True, "ui-backend": True, "objectstore": True, "proxy": True, "snapshots": True,
        "monitor": True}
    assert data["urls"]["metadata_service"] == f"http://127.0.0.1:{stack['port']}/service"
