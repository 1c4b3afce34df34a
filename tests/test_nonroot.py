"""A first run as a user who is not root, on a VM where root has used Metaflow before: install into a
fresh venv, `up` (udocker, images and PostgreSQL all in that user's own folders), `connect`, a real flow
whose artifacts are read back through the client, `down`.

Root's earlier use leaves Metaflow's shared client cache /tmp/metaflow_client owned by root; a second
user's client could not read any artifact through it (FileCacheException). `connect` gives each user a
cache of their own, which this test proves by reading artifacts with that folder in place.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port
from .helpers_firstrun import REPO, stack_processes

USER = "mfstack-nonroot"
SHARED_CLIENT_CACHE = Path("/tmp/metaflow_client")
READ_BACK = textwrap.dedent("""
    import json
    from metaflow import Flow, namespace
    namespace(None)
    run = Flow("FanoutFlow").latest_run
    print(json.dumps({"successful": run.successful, "total": run.data.total,
                      "squares": sorted(task.data.value for task in run["square"])}))
""")


@pytest.fixture
def plain_user() -> Iterator[pwd.struct_passwd]:
    """A fresh login user with a home of its own; removed afterwards with everything it ran."""
    if os.geteuid() != 0:
        pytest.fail("this test makes a user account: run it as root (CI does)")
    subprocess.run(["userdel", "--remove", USER], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
        subprocess.run(["userdel", "--remove", USER], capture_output=True)


def _source_copy(home: Path) -> Path:
    """This checkout as the user would clone it: without the tests' venv or git folder."""
    target = home / "metaflow-stack-src"
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                                ".pytest_cache", "build"))
    return target


def test_a_first_run_as_a_user_who_is_not_root(plain_user: pwd.struct_passwd, registry: str) -> None:
    home = Path(plain_user.pw_dir)
    # Root used Metaflow's client first: its default cache folder is root's, as the client leaves it.
    SHARED_CLIENT_CACHE.mkdir(mode=0o755, exist_ok=True)
    assert SHARED_CLIENT_CACHE.stat().st_uid == 0
    source = _source_copy(home)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(source)], check=True)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "USER": USER, "LOGNAME": USER,
           "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run(*args: str, cwd: Path = home, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              user=plain_user.pw_uid, group=plain_user.pw_gid, extra_groups=[])
        if check:
            assert done.returncode == 0, f"{args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    run("/usr/bin/python3", "-m", "venv", str(home / "venv"))
    py = str(home / "venv" / "bin" / "python")
    run(py, "-m", "pip", "install", "-q", f"{source}[client]")
    ports = {"port": free_port(), "metadata-port": free_port(), "ui-port": free_port(), "db-port": free_port()}
    flags = [f"--{name}={value}" for name, value in ports.items()] + [f"--registry={registry}"]
    root = home / "metaflow-stack"  # the defaults: MF_ROOT and UDOCKER_DIR under this user's home
    try:
        started = run(py, "-m", "installer", "up", *flags)
        assert "stack up in" in started.stdout, started.stdout
        line = started.stdout.strip().splitlines()[-1].removeprefix("connection string: ")
        assert line.startswith(f"http://127.0.0.1:{ports['port']}/?token="), started.stdout
        for path in (root, home / ".udocker"):
            assert path.exists() and path.stat().st_uid == plain_user.pw_uid, path

        connected = run(py, "-m", "installer", "connect", line)
        own_cache = home / ".cache" / "metaflow_client"
        assert f"the Metaflow client caches artifacts in {own_cache}" in connected.stdout, connected.stdout
        profile = json.loads((home / ".metaflowconfig" / "config.json").read_text())
        assert profile["METAFLOW_CLIENT_CACHE_PATH"] == str(own_cache)

        work = home / "work"
        run("mkdir", str(work))
        run("cp", str(source / "tests" / "flows" / "fanout_flow.py"), str(work / "flow.py"))
        flow = run(py, "flow.py", "run", cwd=work)
        assert "total is 14" in flow.stdout + flow.stderr
        seen = json.loads(run(py, "-c", READ_BACK, cwd=work).stdout.strip().splitlines()[-1])
        assert seen == {"successful": True, "total": 14, "squares": [1, 4, 9]}
        assert any(own_cache.iterdir()), "the artifacts were read through the user's own cache"
    finally:
        stopped = run(py, "-m", "installer", "down", check=False)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped 7 service(s) in" in stopped.stdout, stopped.stdout
    assert stack_processes({"root": str(root)}) == []
