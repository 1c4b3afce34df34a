"""What the first-run tests look at: what runs, what is saved, whether an old connection string works."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import installer
from installer import procs, stack, state, stopping
from installer.settings import resolve

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m installer ...` in a child process, importing this checkout."""
    return subprocess.run([sys.executable, "-m", "installer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def stack_processes(flags: dict) -> list[procs.ProcInfo]:
    """Every process on the machine that belongs to this stack (the udocker folder may be shared)."""
    return [p for p in procs.all_processes() if flags["root"] in p.command and p.pid != os.getpid()]


def states(flags: dict) -> dict[str, str]:
    return {s.name: s.state for s in installer.status(**flags).services}


def assert_nothing_runs(flags: dict) -> None:
    assert set(states(flags).values()) == {"stopped"}, states(flags)
    assert stack_processes(flags) == []


def saved_settings(flags: dict) -> dict | None:
    path = resolve({"root": flags["root"]}, environ={}).state_dir / "settings.json"
    return json.loads(path.read_text()) if path.exists() else None


def connection_works(line: str) -> str:
    """The metadata service's version, reached with nothing but the connection string."""
    return installer.connect(line, set_env=False, write_profile=False, timeout=10).service_version


def stop_services(flags: dict, names: tuple[str, ...]) -> None:
    """Stop some services of a running stack, the way `down` stops each, as a crashed `up` may leave it."""
    settings = resolve(flags)
    loaded = stack._load(settings)
    for service in loaded.services:
        pid = state.live_pid(settings, service.name)
        if service.name in names and pid is not None:
            stopping.stop(service, pid, settings.pgdata_dir)
            state.state_file(settings, service.name).unlink()


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder`: a disk that is (nearly) full."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@contextlib.contextmanager
def port_holder(port: int) -> Iterator[subprocess.Popen]:
    """Another program listening on 127.0.0.1:`port`."""
    holder = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {port}")
            time.sleep(0.05)
        yield holder
    finally:
        holder.kill()
        holder.wait()
