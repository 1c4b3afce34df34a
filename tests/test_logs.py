"""Bounded logs: live on local disk, rotated at the cap, copied to MF_ROOT/logs in small segments."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import requests

import installer
from installer import cli, logfiles, monitor, procs
from installer.settings import resolve

MB = 1024 * 1024
# Lines numbered in order, about 130 bytes each, as fast as a busy service writes (~150 KB/s).
_WRITER = r"""
import sys, time
line = 0
began = time.monotonic()
while time.monotonic() - began < float(sys.argv[1]):
    for _ in range(100):
        sys.stdout.write(f"line {line:09d} " + "x" * 112 + "\n")
        line += 1
    sys.stdout.flush()
    time.sleep(0.08)
sys.stdout.write(f"done after {line} lines\n")
"""


def _sizes(live: Path, copies: Path) -> tuple[int, int]:
    # A file gone between listing and stat (the rotator pruned it) counts as 0.
    local = sum(map(logfiles.size, (live, live.with_name(live.name + ".1"))))
    return local, sum(map(logfiles.size, logfiles.segments(copies)))


def test_a_fast_writer_stays_under_the_cap_and_its_newest_lines_all_reach_the_copies(tmp_path: Path) -> None:
    live_dir, logs_dir = tmp_path / "cache" / "logs", tmp_path / "root" / "logs"
    live = live_dir / "writer.log"
    pid = procs.spawn([sys.executable, "-c", _WRITER, "25"], log_path=live)
    bounds = logfiles.limits(1)
    largest = (0, 0)
    rounds = 0
    # The monitor's own cadence: a round every CHECK_EVERY, a copy every COPY_LOGS_EVERY rounds.
    while procs.alive(pid):
        time.sleep(monitor.CHECK_EVERY)
        rounds += 1
        logfiles.tend(live_dir, logs_dir, 1, only_large=rounds % monitor.COPY_LOGS_EVERY != 0)
        local, copied = _sizes(live, logs_dir / "writer")
        largest = (max(largest[0], local), max(largest[1], copied))
    logfiles.tend(live_dir, logs_dir, 1)

    written = int(re.search(r"done after (\d+) lines", procs.tail(live, 3)).group(1))
    assert written * 131 > 3 * MB  # the writer wrote several caps' worth
    assert largest[0] <= bounds.cap, largest
    assert largest[1] <= bounds.cap, largest
    copies = logfiles.segments(logs_dir / "writer")
    assert copies[0].name != "000001.log"  # the oldest segments were pruned
    assert all(p.stat().st_size <= bounds.segment for p in copies)
    assert sum(p.stat().st_size for p in copies) > bounds.cap - 2 * bounds.segment  # the cap is used, not wasted
    # Nothing between the copies is lost: the kept lines are the newest ones, each once, in order.
    text = b"".join(p.read_bytes() for p in copies).decode()
    numbers = [int(n) for n in re.findall(r"^line (\d{9}) ", text, re.MULTILINE)]
    assert numbers == list(range(numbers[0], written)), "a gap or a repeat in the copied lines"
    assert text.rstrip().endswith(f"done after {written} lines")
    # `logs` points at the live file while it exists, and at the newest copy on a new machine.
    assert logfiles.readable(live, logs_dir, "writer") == live
    live.unlink()
    assert logfiles.readable(live, logs_dir, "writer") == copies[-1]


def test_a_flooded_entry_point_keeps_its_log_under_the_cap(stack: dict) -> None:
    flags = {**stack, "log_max_mb": "1", "no_snapshots": "1"}
    settings = resolve(flags)
    installer.up(**flags)
    live, copies = settings.log_path("proxy"), settings.logs_dir / "proxy"
    assert live.is_relative_to(settings.cache_dir) and not live.is_relative_to(settings.root)
    assert {s.log for s in installer.status(**flags).services} == {
        str(settings.log_path(s.name)) for s in installer.status(**flags).services}
    token = installer.token(**flags)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        with requests.Session() as session:
            session.headers["x-api-key"] = token
            url = f"http://127.0.0.1:{settings.port}/service/ping?" + "q=" + "a" * 200
            while not stop.is_set():
                session.get(url, timeout=10)
                sent[0] += 1

    largest = (0, 0)
    floods = [threading.Thread(target=flood) for _ in range(4)]
    for thread in floods:
        thread.start()
    try:
        began = time.monotonic()
        while time.monotonic() - began < 90 and sent[0] < 40000:
            time.sleep(0.5)
            local, copied = _sizes(live, copies)
            largest = (max(largest[0], local), max(largest[1], copied))
    finally:
        stop.set()
        for thread in floods:
            thread.join()
    segments = logfiles.segments(copies)
    installer.down(**flags)
    assert sent[0] > 5000, sent
    assert largest[0] <= MB and largest[1] <= MB, (largest, sent)
    assert segments and segments[0].name != "000001.log", (segments, sent)  # rotated, and copies pruned
    assert all(p.stat().st_size <= logfiles.limits(1).segment for p in logfiles.segments(copies))
    # `down` copies what the monitor's last round left: the copies end where the live log ends.
    last_copied = logfiles.segments(copies)[-1].read_text(errors="replace").rstrip().splitlines()[-1]
    assert last_copied == live.read_text(errors="replace").rstrip().splitlines()[-1]
    print(f"{sent[0]} requests; largest: local {largest[0]} B, copies {largest[1]} B")


def test_logs_follow_goes_on_across_rotations(tmp_path: Path) -> None:
    live_dir, logs_dir = tmp_path / "cache" / "logs", tmp_path / "root" / "logs"
    live = live_dir / "writer.log"
    live.parent.mkdir(parents=True)
    live.write_text("")
    shown: list[str] = []
    follower = threading.Thread(target=cli._follow, args=({"writer": live}, SimpleNamespace(line=shown.append)),
                                daemon=True)
    follower.start()
    time.sleep(0.5)
    pid = procs.spawn([sys.executable, "-c", _WRITER, "12"], log_path=live)
    rotations = 0
    while procs.alive(pid):
        time.sleep(0.5)
        before = live.stat().st_size
        logfiles.tend(live_dir, logs_dir, 1)
        rotations += live.stat().st_size < before
    time.sleep(1.0)
    numbers = [int(found.group(1)) for found in map(re.compile(r"^line (\d{9}) ").match, shown) if found]
    assert rotations >= 3
    assert numbers == list(range(len(numbers))) and shown[-1].startswith("done after"), "a gap or a repeat"
