"""A new user's first runs: a failed `up` leaves nothing half-done and saves nothing; the next plain
`up` works and the old connection string with it; saved settings are announced; pull errors are
shown once; the stack's own probes leave its logs clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import installer
from installer import procs, runtime
from installer.errors import ChecksFailed, ImageError, PortInUse, ServiceFailed
from installer.settings import resolve

from .conftest import free_port
from .helpers_firstrun import (REPO, assert_nothing_runs, cli, connection_works, port_holder, saved_settings,
                               small_disk, stack_processes, stop_services)


def _assert_quiet_logs(flags: dict) -> None:
    """The stack's own health probes leave nothing in the logs that asks for a reader."""
    settings = resolve(flags)
    postgres_log = settings.log_path("postgres").read_text()
    assert "FATAL" not in postgres_log, postgres_log[-3000:]
    assert "Traceback" not in settings.log_path("objectstore").read_text()


def test_failed_ups_leave_nothing_and_the_old_connection_string_keeps_working(stack: dict, tmp_path: Path) -> None:
    installer.up(**stack)
    line = installer.connection(**stack)
    installer.status(**stack)  # a few more probes of every service
    installer.down(**stack)
    saved = saved_settings(stack)
    assert saved is not None and saved["port"] == stack["port"]
    plain = {"root": stack["root"]}  # what a user types later: the saved settings do the rest

    taken = free_port()
    with port_holder(taken) as holder:
        with pytest.raises(PortInUse) as caught:
            installer.up(**plain, port=str(taken))
        text = str(caught.value)
        assert f"port {taken}, needed by the entry point (reverse proxy), is already taken by pid {holder.pid}" in text
        assert "--port (MF_PORT), e.g. --port " in text
        assert "the connection string changes with it" in text and "nothing was started" in text
        assert_nothing_runs(stack)
        assert saved_settings(stack) == saved

        # Several problems at once: all are reported, each with its hint.
        with small_disk(tmp_path / "small") as small:
            with pytest.raises(ChecksFailed) as caught:
                installer.up(**plain, port=str(taken), pgdata_dir=str(small / "pgdata"))
        text = str(caught.value)
        assert text.startswith("2 problems; nothing was started:")
        assert f"1. port {taken}, needed by the entry point" in text
        assert f"2. not enough free disk space for the database: 4.2 MB free under {small / 'pgdata'}" in text
        assert "point --pgdata-dir (PGDATA_DIR) to a larger disk" in text
        assert_nothing_runs(stack)
        assert saved_settings(stack) == saved

    with pytest.raises(ImageError) as caught:  # a fresh udocker folder needs the images: the registry is down
        installer.up(**plain, udocker_dir=str(tmp_path / "fresh-udocker"), registry=f"http://127.0.0.1:{free_port()}")
    assert "is not answering (connection refused)" in str(caught.value)
    assert "bash scripts/local_registry.sh start" in str(caught.value)
    assert_nothing_runs(stack)
    assert saved_settings(stack) == saved

    with pytest.raises(ImageError) as caught:
        installer.up(**plain, service_image="mfstack/no-such-image:1")
    assert f"image mfstack/no-such-image:1 is not in {stack['registry']}" in str(caught.value)
    assert "nothing was started" in str(caught.value)
    assert_nothing_runs(stack)
    assert saved_settings(stack) == saved

    status = installer.up(**plain)
    assert status.running and not status.already_running
    assert installer.connection(**plain) == line
    assert connection_works(line)
    _assert_quiet_logs(stack)


def test_a_failing_start_stops_only_what_this_up_started(stack: dict) -> None:
    installer.up(**stack)
    line = installer.connection(**stack)
    saved = saved_settings(stack)
    # What a crashed `up` or a killed process leaves: part of the stack still runs.
    stop_services(stack, ("monitor", "proxy", "ui-backend"))
    before = {s.name: s.pid for s in installer.status(**stack).services if s.state == "running"}
    assert set(before) == {"postgres", "metadata", "objectstore", "snapshots"}

    with pytest.raises(ServiceFailed) as caught:  # too short for the UI backend to answer
        installer.up(**{**stack, "start_timeout": "0.1", "wait_ui": True})
    text = str(caught.value)
    # The UI backend never answers that fast; on a busy machine the entry point may miss it first.
    failed = {"the UI backend": "ui-backend", "the entry point (reverse proxy)": "proxy"}
    named = [service for words, service in failed.items() if f"{words} did not become healthy within 0 s" in text]
    assert len(named) == 1, text
    assert f"last lines of {resolve(stack).log_path(named[0])}" in text
    # The entry point starts beside the UI backend (both wait only for PostgreSQL and the object store).
    assert ("`up` stopped what it had started (proxy, ui-backend); still running from before this `up`: "
            "postgres, metadata, objectstore, snapshots (`python -m installer down` stops them); "
            "no setting was saved.") in text
    after = {s.name: s.pid for s in installer.status(**stack).services if s.state == "running"}
    assert after == before
    assert not [p for p in stack_processes(stack) if "ui_server" in p.command or "installer.proxy" in p.command]
    assert saved_settings(stack) == saved

    assert installer.up(root=stack["root"]).running
    assert connection_works(line)


def test_saved_settings_are_announced_and_can_be_cleared(stack: dict) -> None:
    installer.up(**stack)
    root = stack["root"]
    done = cli("up", "--root", root)
    assert done.returncode == 0, done.stderr
    assert f"using settings saved by an earlier `up` ({root}/state/settings.json): " in done.stdout
    assert f"registry={stack['registry']}" in done.stdout
    assert "images come from there, not from the defaults" in done.stdout
    assert "`python -m installer config --clear` forgets them" in done.stdout
    assert "The stack is already running." in done.stdout

    refused = cli("config", "--clear", "--root", root)
    assert refused.returncode == 1
    assert "the stack is running (" in refused.stderr and "run `python -m installer down` first" in refused.stderr
    assert saved_settings(stack) is not None

    assert cli("down", "--root", root).returncode == 0
    cleared = cli("config", "--clear", "--root", root)
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.startswith("forgot the saved settings: ") and f"registry={stack['registry']}" in cleared.stdout
    assert saved_settings(stack) is None
    rows = {line.split()[0]: line for line in cli("config", "--root", root).stdout.splitlines()}
    assert rows["registry"].endswith("(default)") and "7860" in rows["port"]
    assert "***" in rows["token"] and f"(generated, in {root}/secrets/token)" in rows["token"]


def test_docker_hub_unreachable_is_said_once_with_the_offline_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # However this machine reaches the internet, a proxy that refuses makes Docker Hub unreachable.
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{free_port()}")
    udocker = runtime.prepare(tmp_path / "udocker", tmp_path / "bin", lambda _: None)
    shown: list[str] = []
    with pytest.raises(ImageError) as caught:
        udocker.pull("postgres:15.10-bookworm", None, shown.append)
    error = caught.value
    assert error.message == "could not pull postgres:15.10-bookworm: no registry could be reached"
    lines = (error.log_tail or "").splitlines()
    # Every registry of the default list was tried, each said once.
    assert lines == [f"tried {label}: {url} did not answer (the proxy refused the connection)"
                     for label, url in (("docker.io", "https://registry-1.docker.io"),
                                        ("mirror.gcr.io", "https://mirror.gcr.io"),
                                        ("public.ecr.aws/docker/library", "https://public.ecr.aws"),
                                        ("public.ecr.aws/outerbounds", "https://public.ecr.aws"))], lines
    assert not [line for line in shown if "Error" in line]
    assert "bash scripts/offline_up.sh" in error.hint and "--registry" in error.hint

    # `up` finds it before pulling anything, and says it once.
    done = cli("up", "--root", str(tmp_path / "root"), "--udocker-dir", str(tmp_path / "udocker"),
               "--port", str(free_port()), "--db-port", str(free_port()), "--metadata-port", str(free_port()),
               "--ui-port", str(free_port()))
    assert done.returncode == 1
    assert done.stderr.count("Docker Hub (https://registry-1.docker.io) cannot be reached") == 1, done.stderr
    assert "bash scripts/offline_up.sh" in done.stderr and "nothing was started" in done.stderr
    assert saved_settings({"root": str(tmp_path / "root")}) is None


def test_config_clear_with_nothing_saved(tmp_path: Path) -> None:
    done = cli("config", "--clear", "--root", str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == "no settings were saved"


def test_warm_offline_up_skips_the_setup_and_says_how_the_registry_stops(stack: dict) -> None:
    env = {**os.environ, "MFSTACK_VENV": sys.prefix}
    check = subprocess.run(["bash", str(REPO / "scripts" / "setup_host.sh"), "--check"], env=env)
    assert check.returncode == 0, (f"the setup of {sys.prefix} is not current: run scripts/setup_host.sh "
                                   "(scripts/test.sh does) before this test")
    args = [f"--{name.replace('_', '-')}={value}" for name, value in stack.items()]
    done = subprocess.run(["bash", str(REPO / "scripts" / "offline_up.sh"), *args], capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[setup] already done and current (system packages, .venv, images); skipped" in done.stdout
    assert "[build_images" not in done.stdout and "[setup] installing" not in done.stdout
    assert "local_registry: already running" in done.stdout
    assert "`mfstack down --all` stops it too" in done.stdout
    assert "stack up in" in done.stdout and "connection string: http://127.0.0.1:" in done.stdout
    assert installer.status(**stack).running
    assert done.stdout.rstrip().splitlines()[-2:] == [
        "This project's commands: `mfstack <command>`, e.g. `mfstack status`, `mfstack down`;",
        f"for `python -m installer <command>` as the README writes them, first run `. {sys.prefix}/bin/activate` "
        "in your shell."]
    assert os.readlink("/usr/local/bin/mfstack") == f"{sys.prefix}/bin/mfstack"

    # What the README then tells a user to type, in a login shell that knows nothing of the venv.
    plain_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    root = f"--root={stack['root']}"
    for line in (f"mfstack status {root}", f". {sys.prefix}/bin/activate && python -m installer status {root}"):
        typed = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120, env=plain_env,
                               cwd="/")
        assert typed.returncode == 0, (line, typed.stdout, typed.stderr)
        assert "postgres    healthy" in typed.stdout, typed.stdout
    down = subprocess.run(["bash", "-c", "mfstack down --all --help"], capture_output=True, text=True,
                          env=plain_env)
    assert down.returncode == 0 and down.stdout.startswith("usage: mfstack down"), down.stdout


def test_down_all_stops_the_registry_the_scripts_started(tmp_path: Path) -> None:
    port = free_port()
    env = {"MFSTACK_CACHE": str(tmp_path / "cache"), "MFSTACK_REGISTRY_PORT": str(port)}
    script = str(REPO / "scripts" / "local_registry.sh")
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env})
    assert started.returncode == 0, started.stdout + started.stderr
    flags = ("--root", str(tmp_path / "root"), "--registry", f"http://127.0.0.1:{port}")
    try:
        plain = cli("down", *flags, env=env)
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.splitlines() == [
            "nothing was running",
            f"the local registry http://127.0.0.1:{port} (started by this project's scripts) keeps running; "
            "`python -m installer down --all` stops it too"]
        every = cli("down", "--all", *flags, env=env)
        assert every.returncode == 0, every.stderr
        assert every.stdout.splitlines()[-1].startswith("local registry: stopped (pid ")
        assert procs.listener_of(port) is None
        again = cli("down", *flags, env=env)
        assert again.stdout.splitlines() == ["nothing was running"]
    finally:
        subprocess.run(["bash", script, "stop"], capture_output=True, env={**os.environ, **env})
