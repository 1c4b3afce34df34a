"""The command line and the documentation stay true to the settings table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from installer.settings import SETTINGS, resolve

from .conftest import REPO


def _run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme, setting.env
        if setting.on_command_line:
            assert f"`--{setting.name.replace('_', '-')}`" in readme, setting.name


def test_config_shows_where_each_value_comes_from(tmp_path: Path) -> None:
    done = _run("-m", "installer", "config", "--root", str(tmp_path), "--port", "9999",
                env={"MF_DB_PORT": "6543"})
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert "9999" in rows["port"] and "(flag)" in rows["port"]
    assert "6543" in rows["db_port"] and "(env MF_DB_PORT)" in rows["db_port"]
    assert "(default)" in rows["bind"]


def test_settings_saved_by_up_are_used_by_later_commands(tmp_path: Path) -> None:
    from installer.settings import save

    save(resolve({"root": str(tmp_path), "port": "9100"}))
    later = resolve({"root": str(tmp_path)}, environ={})
    assert later.port == 9100 and later.sources["port"] == "saved by `up`"
    assert resolve({"root": str(tmp_path), "port": "9200"}, environ={}).port == 9200
    assert resolve({"root": str(tmp_path)}, environ={"MF_PORT": "9300"}).port == 9300


def test_a_shadowing_installer_package_is_named(tmp_path: Path) -> None:
    impostor = tmp_path / "installer"
    impostor.mkdir()
    (impostor / "__init__.py").write_text('"""Some other package that is also called installer."""\n')
    done = _run("-m", "mfstack", "status", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}, cwd=tmp_path)
    assert done.returncode == 2
    assert str(impostor / "__init__.py") in done.stderr
    assert "pip uninstall -y installer" in done.stderr


def test_mfstack_runs_the_stack_command_line(tmp_path: Path) -> None:
    done = _run("-m", "mfstack", "config", "--root", str(tmp_path), env={"PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) in done.stdout


def test_errors_are_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    done = _run("-m", "installer", "logs", "nonsense", "--root", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("error: no service named 'nonsense'")
    assert "Traceback" not in done.stderr
