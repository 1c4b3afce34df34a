"""Benchmark: cold `up`, warm `up`, `down`, and the whole stack's resident memory.

Cold: nothing pulled, an empty MF_ROOT, images from the local registry.
Warm: images pulled, containers created, data present (the usual restart).
Run after scripts/setup_host.sh (which builds the images and starts the registry):

    .venv/bin/python scripts/bench_stack.py [--rounds 3]

Prints medians of the warm rounds; figures are for comparing runs on one machine.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import installer
from installer import procs

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory(flags: dict) -> tuple[float, float, int]:
    """(RSS MB summed, PSS MB summed, process count) over every process of the stack."""
    status = installer.status(**flags)
    pids: set[int] = set()
    for service in status.services:
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


def _timed(action) -> float:
    began = time.monotonic()
    action()
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="warm up/down rounds (default 3)")
    parser.add_argument("--registry", default="http://127.0.0.1:5000")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mfstack-bench-"))
    flags = {"root": str(work / "root"), "udocker_dir": str(work / "udocker"), "registry": args.registry,
             "port": str(_free_port()), "metadata_port": str(_free_port()), "ui_port": str(_free_port()),
             "db_port": str(_free_port())}
    try:
        cold = _timed(lambda: installer.up(**flags))
        rss, pss, count = _memory(flags)
        downs = [_timed(lambda: installer.down(**flags))]
        warms = []
        for _ in range(args.rounds):
            warms.append(_timed(lambda: installer.up(**flags)))
            downs.append(_timed(lambda: installer.down(**flags)))
        size = sum(f.stat().st_size for f in Path(flags["udocker_dir"]).rglob("*") if f.is_file() and not f.is_symlink())
        print("stack benchmark (production images from the local registry; udocker P1 with "
              f"{'system proot' if (Path(flags['root']) / 'bin' / 'proot-udocker').exists() else 'udocker engine'})")
        print(f"  cold up (nothing pulled, empty MF_ROOT): {cold:6.1f} s")
        print(f"  warm up (median of {len(warms)}):              {statistics.median(warms):6.1f} s"
              f"   (min {min(warms):.1f}, max {max(warms):.1f})")
        print(f"  down (median of {len(downs)}):                 {statistics.median(downs):6.2f} s")
        print(f"  resident memory, whole stack:            {rss:6.0f} MB RSS, {pss:.0f} MB PSS, {count} processes")
        print(f"  udocker folder:                          {size / 1e6:6.0f} MB")
        print(f"  warm-up target 10 s: {'met' if statistics.median(warms) <= 10 else 'NOT met'}")
    finally:
        try:
            installer.down(**flags)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
