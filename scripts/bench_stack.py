"""Benchmark the stack with the real service image: start-up, the floor under it, `down`, memory.

    .venv/bin/python scripts/bench_stack.py [--rounds 5] [--runs 10] [--registry http://127.0.0.1:5000]

Run after scripts/setup_host.sh (which builds the production images and starts the registry).
Prints, from one run (machines here are noisy: compare figures of one run, not across runs):

- cold `up`: an empty MF_ROOT and an empty udocker folder (pull + create + initdb + schema);
- warm `up` (median of --rounds): time until a flow can be tracked (the metadata API answers through
  the entry point with the token) and until the UI is ready (the UI backend answers through it), both
  measured from outside `up`, and when `up` itself returned;
- the floor, in the same run: the metadata service and the UI backend each started bare with
  `udocker run` (same container, same database) to their first answer; the project's overhead is
  the warm figure over the floor;
- `down` (median);
- the whole stack's RSS and PSS at idle, after --runs flows plus UI reads of each, and once idle
  again (the UI backend's cache pools let their workers go after MFSTACK_CACHE_POOL_IDLE_S).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

import installer
from installer import procs
from installer.connection import format_connection
from installer.services import SERVICE_PYTHON, UI_BACKEND_TUNING, service_container
from installer.settings import resolve

REPO = Path(__file__).resolve().parent.parent
FLOW = REPO / "tests" / "flows" / "fanout_flow.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flags(work: Path, registry: str, udocker_dir: Path) -> dict:
    return {"root": str(work / "root"), "udocker_dir": str(udocker_dir), "registry": registry,
            "port": str(_free_port()), "metadata_port": str(_free_port()), "ui_port": str(_free_port()),
            "db_port": str(_free_port())}


def _memory(flags: dict) -> tuple[float, float, int]:
    """(RSS MiB summed, PSS MiB summed, process count) over every process of the stack."""
    pids: set[int] = set()
    for service in installer.status(**flags).services:
        if service.pid:
            pids.add(service.pid)
            pids.update(p.pid for p in procs.descendants(service.pid))
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024, len(pids)


def _answers(url: str, headers: dict | None = None, expect: str = "pong") -> bool:
    try:
        answer = requests.get(url, headers=headers or {}, timeout=2)
    except requests.RequestException:
        return False
    return answer.status_code == 200 and expect in answer.text


def _first_answer(began: float, url: str, headers: dict | None = None, timeout: float = 180) -> float:
    while time.monotonic() - began < timeout:
        if _answers(url, headers):
            return time.monotonic() - began
        time.sleep(0.02)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def _warm_up(flags: dict, token: str) -> tuple[float, float, float]:
    """(until a flow can be tracked, until the UI is ready, until `up` returned), from one start."""
    base = f"http://127.0.0.1:{flags['port']}"
    headers = {"x-api-key": token}
    returned: list[float] = []
    began = time.monotonic()
    thread = threading.Thread(target=lambda: (installer.up(**flags), returned.append(time.monotonic() - began)))
    thread.start()
    track = _first_answer(began, f"{base}/service/ping", headers)
    ui = _first_answer(began, f"{base}/api/ping", headers)
    thread.join()
    return track, ui, returned[0]


def _floor(flags: dict) -> tuple[float, float]:
    """The metadata service and the UI backend started bare with `udocker run`, to their first answer."""
    settings = resolve(flags)
    password = (settings.secrets_dir / "db_password").read_text().strip()
    db = {"MF_METADATA_DB_HOST": "127.0.0.1", "MF_METADATA_DB_PORT": str(settings.db_port),
          "MF_METADATA_DB_USER": "postgres", "MF_METADATA_DB_PSWD": password, "MF_METADATA_DB_NAME": "metaflow"}
    udocker = [str(Path(sys.executable).parent / "udocker"), "--allow-root", "run", "--nobanner", "--user=root"]
    container = service_container(settings)
    env = {**os.environ, "UDOCKER_DIR": str(settings.udocker_dir), "UDOCKER_DEFAULT_EXECUTION_MODE": "P1"}
    wrapper = settings.cache_dir / "bin" / "proot-udocker"
    if wrapper.exists():
        env.update(UDOCKER_USE_PROOT_EXECUTABLE=str(wrapper), UDOCKER_TARBALL="")
    cases = {
        "metadata": ({**db, "MF_METADATA_HOST": "127.0.0.1", "MF_METADATA_PORT": "{port}"},
                     [SERVICE_PYTHON, "-m", "services.metadata_service.server"], "/ping"),
        "ui-backend": ({**db, "MF_UI_METADATA_HOST": "127.0.0.1", "MF_UI_METADATA_PORT": "{port}",
                        "PATH_PREFIX": "/api", "UI_ENABLED": "0"},
                       ["/bin/sh", "-c", f"mkdir -p /tmp/bench-ui && cd /tmp/bench-ui && exec {SERVICE_PYTHON} "
                        "-m services.ui_backend_service.ui_server"], "/api/ping"),
    }
    results = []
    for variables, argv, ping in cases.values():
        port = _free_port()
        args = [f"--env={k}={v.format(port=port)}" for k, v in variables.items()]
        log = settings.logs_dir / "bench-floor.log"
        began = time.monotonic()
        pid = procs.spawn([*udocker, "--workdir=/root", *args, container, *argv], log_path=log, env=env)
        try:
            results.append(_first_answer(began, f"http://127.0.0.1:{port}{ping}"))
        finally:
            guests = [p.pid for p in procs.descendants(pid)
                      if "udocker" not in " ".join(p.cmdline[:2]) and "proot" not in (p.cmdline or [""])[0]]
            for guest in guests:
                procs.send(guest, 19)  # SIGSTOP: the UI backend re-spawns workers otherwise
            procs.kill_tree(guests)
            procs.wait_gone([pid], 10)
    return results[0], results[1]


def _timed(action: Callable[[], object]) -> float:
    began = time.monotonic()
    action()
    return time.monotonic() - began


def _use(flags: dict, token: str, work: Path, runs: int) -> None:
    """`runs` FanoutFlow runs from another HOME, and the UI's reads of each (runs, DAG, logs, artifacts)."""
    base = f"http://127.0.0.1:{flags['port']}"
    home = work / "client-home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "USER": "bench", "LANG": "C.UTF-8"}
    subprocess.run([sys.executable, "-m", "installer", "connect", format_connection(base, token)], env=env,
                   cwd=work, check=True, capture_output=True)
    headers = {"x-api-key": token}
    for _ in range(runs):
        subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run"], env=env, cwd=work, check=True,
                       capture_output=True)
    listing = requests.get(f"{base}/api/flows/FanoutFlow/runs", headers=headers, timeout=60).json()["data"]
    for run in listing:
        path = f"{base}/api/flows/FanoutFlow/runs/{run['run_number']}"
        requests.get(f"{path}/dag", headers=headers, timeout=60)
        for task in requests.get(f"{path}/steps/square/tasks", headers=headers, timeout=60).json()["data"]:
            task_path = f"{path}/steps/square/tasks/{task['task_id']}"
            requests.get(f"{task_path}/logs/out", headers=headers, params={"attempt_id": "0"}, timeout=60)
            requests.get(f"{task_path}/artifacts", headers=headers, params={"postprocess": "true"}, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="warm up/down rounds (default 5)")
    parser.add_argument("--runs", type=int, default=10, help="flows run before the second memory reading")
    parser.add_argument("--registry", default="http://127.0.0.1:5000")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mfstack-bench-"))
    flags = _flags(work, args.registry, work / "udocker")
    try:
        cold = _timed(lambda: installer.up(**flags))
        token = installer.token(**flags) or ""
        time.sleep(5)  # let the UI backend's workers settle before reading memory
        idle = _memory(flags)
        floors = [_floor(flags) for _ in range(args.rounds)]
        downs = [_timed(lambda: installer.down(**flags))]
        warms = []
        for _ in range(args.rounds):
            warms.append(_warm_up(flags, token))
            downs.append(_timed(lambda: installer.down(**flags)))
        installer.up(**flags)
        _use(flags, token, work, args.runs)
        used = _memory(flags)
        time.sleep(float(UI_BACKEND_TUNING["MFSTACK_CACHE_POOL_IDLE_S"]) + 10)  # the cache pools' workers leave
        rested = _memory(flags)

        def median(values: list[float]) -> str:
            return f"{statistics.median(values):6.2f} s (min {min(values):.2f}, max {max(values):.2f})"

        track = [w[0] for w in warms]
        ui = [w[1] for w in warms]
        floor_md = [f[0] for f in floors]
        floor_ui = [f[1] for f in floors]
        print(f"stack benchmark: production images from {args.registry}, udocker P1, {os.cpu_count()} cores")
        print(f"  cold up (pull + create + initdb + schema):   {cold:6.1f} s")
        print(f"  warm up, until a flow can be tracked:        {median(track)}   goal <= 3 s")
        print(f"  warm up, until the UI is ready:              {median(ui)}   goal <= 8 s")
        print(f"  warm up, until `up` returned:                {median([w[2] for w in warms])}")
        print(f"  floor, metadata service bare to /ping:       {median(floor_md)}")
        print(f"  floor, UI backend bare to /api/ping:         {median(floor_ui)}")
        print(f"  overhead over the floor: tracking {statistics.median(track) / statistics.median(floor_md):.2f}x, "
              f"UI {statistics.median(ui) / statistics.median(floor_ui):.2f}x   goal <= 1.2x")
        print(f"  down:                                        {median(downs)}")
        print(f"  memory at idle:           {idle[0]:6.0f} MiB RSS, {idle[1]:5.0f} MiB PSS, {idle[2]} processes"
              "   goal <= 700 MiB RSS")
        print(f"  memory after {args.runs} runs + UI: {used[0]:6.0f} MiB RSS, {used[1]:5.0f} MiB PSS, {used[2]} processes")
        print(f"  memory idle again after:  {rested[0]:6.0f} MiB RSS, {rested[1]:5.0f} MiB PSS, {rested[2]} processes"
              "   (the UI cache pools' workers gone; PostgreSQL keeps the backends of the UI backend's pools)")
    finally:
        try:
            installer.down(**flags)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
