"""The README's first run in a fresh virtual environment, as a new user meets it: `pip install .`,
`up`, `connect`, the client extra, a real flow in a root shell without $USER, `down`; under the
tests' own Python and under 3.12, the version Colab ships."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import stack_flags
from .helpers_firstrun import REPO, stack_processes

FLOW = REPO / "tests" / "flows" / "fanout_flow.py"
READ_BACK = textwrap.dedent("""
    import json
    from metaflow import Flow, namespace
    namespace(None)
    run = Flow("FanoutFlow").latest_run
    print(json.dumps({"successful": run.successful, "total": run.data.total,
                      "user": [tag for tag in run.system_tags if tag.startswith("user:")],
                      "steps": sorted(step.id for step in run)}))
""")


def python_312() -> str:
    """Python 3.12: $MFSTACK_PYTHON312, else pyenv's, else python3.12 on PATH; fails loudly without it."""
    candidates = [os.environ.get("MFSTACK_PYTHON312", "")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    candidates.append(shutil.which("python3.12") or "")
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == "(3, 12)":
            return candidate
    pytest.fail("no Python 3.12 with venv and ensurepip found (MFSTACK_PYTHON312, ~/.pyenv/versions/3.12*, "
                "PATH): install it (pyenv install 3.12, or apt-get install python3.12-venv); "
                "scripts/setup_host.sh says whether it found one")


def _base_python() -> str:
    return getattr(sys, "_base_executable", sys.executable)


@pytest.mark.parametrize("which", ["tests-python", "3.12"])
def test_first_run_in_a_fresh_venv_without_user(which: str, tmp_path: Path, registry: str) -> None:
    python = python_312() if which == "3.12" else _base_python()
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    home = tmp_path / "home"
    home.mkdir()
    # A root shell as Colab's: no USER, LOGNAME or USERNAME, nothing of this checkout on sys.path.
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR",
                                                                                 "/root/.cache/pip")}

    def run(*args: str, cwd: Path = tmp_path, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    py = str(venv / "bin" / "python")
    run(py, "-m", "pip", "install", "-q", str(REPO))
    flags = stack_flags(tmp_path / "root", registry)
    args = [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]
    try:
        started = run(py, "-m", "installer", "up", *args)
        line = started.stdout.strip().splitlines()[-1].removeprefix("connection string: ")
        assert line.startswith(f"http://127.0.0.1:{flags['port']}/?token="), started.stdout

        # Without the client extra, `connect` says what is missing and how to install it.
        bare = run(py, "-m", "installer", "connect", line)
        assert "WARNING: this Python" in bare.stdout and "lacks metaflow and boto3" in bare.stdout
        assert "pip install '.[client]'" in bare.stdout
        assert "runs are recorded as user 'notebook' (METAFLOW_USER in the profile)" in bare.stdout

        run(py, "-m", "pip", "install", "-q", f"{REPO}[client]")
        connected = run(py, "-m", "installer", "connect", line)
        assert "WARNING" not in connected.stdout, connected.stdout
        profile = json.loads((home / ".metaflowconfig" / "config.json").read_text())
        assert profile["METAFLOW_USER"] == "notebook" and profile["METAFLOW_DEFAULT_DATASTORE"] == "s3"

        work = tmp_path / "work"
        work.mkdir()
        shutil.copy(FLOW, work / "flow.py")
        flow = run(py, "flow.py", "run", cwd=work)
        assert "total is 14" in flow.stdout + flow.stderr
        seen = json.loads(run(py, "-c", READ_BACK, cwd=work).stdout.strip().splitlines()[-1])
        assert seen == {"successful": True, "total": 14, "user": ["user:notebook"],
                        "steps": ["end", "join", "square", "start"]}
    finally:
        stopped = subprocess.run([py, "-m", "installer", "down", "--root", flags["root"]], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 7 service(s) in" in stopped.stdout, stopped.stdout
    assert stack_processes(flags) == []
