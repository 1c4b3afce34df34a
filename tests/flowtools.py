"""Run a real flow and read it back with the real Metaflow client, each in its own process.

The client keeps its configuration in process-wide state, so every run and every
read happens in a fresh interpreter with exactly the environment given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

FLOWS = Path(__file__).resolve().parent / "flows"


def client_env(home: Path, service_url: str, token: str | None, datastore: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("METAFLOW_")}
    env.update({
        "HOME": str(home),
        "USERNAME": "tester",
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": service_url,
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(datastore),
    })
    if token:
        env["METAFLOW_SERVICE_AUTH_KEY"] = token
    return env


def run_flow(name: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FLOWS / name), "--no-pylint", "run"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def read_latest_run(flow: str, env: dict[str, str], artifact: str) -> dict:
    """Facts about the flow's latest run as the client sees them."""
    code = textwrap.dedent(f"""
        import json
        from metaflow import Flow, namespace
        namespace(None)
        run = Flow({flow!r}).latest_run
        print(json.dumps({{
            "id": run.id,
            "successful": run.successful,
            "finished": run.finished,
            "steps": sorted(step.id for step in run),
            "artifact": run.data.{artifact},
            "tasks": {{step.id: len(list(step)) for step in run}},
        }}))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"reading the run back failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def remote_env(home: Path) -> dict[str, str]:
    """A shell on another machine: nothing of this one's Metaflow or stack settings, its own HOME."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "USER": "remote-tester", "LANG": "C.UTF-8"}


def connect_remote(connection_string: str, env: dict[str, str], cwd: Path) -> str:
    """`python -m installer connect <connection string>` as a user types it; returns what it printed."""
    done = subprocess.run([sys.executable, "-m", "installer", "connect", connection_string], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"connect failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
