#!/usr/bin/env python3
"""Persistence driver: random, seeded sequences of what a Colab user does to the stack, with every
invariant checked after every event.

    python scripts/torture.py [--sequences 40] [--events 5] [--seed S] [--until HH:MM] [--keep-going]
    python scripts/torture.py --replay 'seed=7 drive=0.1/3/2 up,flows,kill:load,up,...' [--keep]

Each sequence has its own Drive-like mount (tests/drivefs.py) with settings drawn for it (latency up
to 0.2 s per operation, uploads up to 5 s late and reordered by up to 5 s more), two notebooks on
other machines running PayloadFlow (a foreach, ~200 KB per task), and these events, drawn from a
model of whether the stack runs:

    up              `up` on this runtime (a fresh one restores from Drive)
    flows           both notebooks run a flow to its end
    kill:KIND       the runtime dies (every process SIGKILLed, local disk wiped): idle, load (flows
                    running), after (0-3 s after a run finished), snapshot (a `snapshot` in progress),
                    up (during `up`), restore (during the restore of `up`, or of `restore --force`)
    failup          `up` while another program holds one of the stack's ports
    down            `down`
    restore         `restore --force` (the stack down)
    rotate          `rotate-token`, then both notebooks connect again

After every event: the runs shown successful are a prefix of the finished ones (runs the restore
marked lost may be holes, shown unfinished by client and UI alike); no run id or task id was ever
handed out twice; every successful run's artifacts and logs read through the client and through the
UI API; the UI's status of every run agrees with the client's; pg_amcheck is clean; a failed `up`
named the port and left nothing running. A failing sequence is printed as a replay string.

Needs root, fuse3, PostgreSQL 15's binaries (pg_amcheck) and the local registry with the images.
"""

from __future__ import annotations

import argparse
import datetime
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.torture_events import Figures, Sequence, draw_drive, parse_replay, plan, replay_string  # noqa: E402


def say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def deadline_of(until: str | None) -> float | None:
    if not until:
        return None
    hours, minutes = (int(part) for part in until.split(":"))
    now = datetime.datetime.now()
    stop = now.replace(hour=hours, minute=minutes, second=0, microsecond=0)
    if stop <= now:
        stop += datetime.timedelta(days=1)
    return time.time() + (stop - now).total_seconds()


def report(figures: Figures, began: float) -> None:
    kills = sum(figures.kills.values())
    windows = figures.windows
    print()
    print(f"sequences {figures.sequences}, events {figures.events}, runtime deaths {kills} "
          f"({time.monotonic() - began:.0f} s in all)")
    print("kills by kind: " + (", ".join(f"{kind} {count}" for kind, count in sorted(figures.kills.items()))
                               or "none") + f" (a snapshot still running at {figures.mid_snapshot} of them)")
    print(f"restores: {figures.restores}; runs finished: {figures.runs_finished}; finished runs lost: "
          f"{figures.lost}, marked lost by the restore (shown unfinished): {figures.marked}")
    if windows:
        print(f"loss window (earliest lost finish to the death): median {statistics.median(windows):.1f} s, "
              f"max {max(windows):.1f} s, over {len(windows)} restores that lost runs")
    print(f"runs shown finished without their data: {figures.without_data} (must be 0)")
    print(f"ids reused: {figures.reused} (must be 0)")
    print(f"violations: {len(figures.violations)}")
    for violation in figures.violations:
        print(f"  {violation}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=40)
    parser.add_argument("--events", type=int, default=5, help="events per sequence (one `up` more at the end "
                                                              "if the last left the stack down)")
    parser.add_argument("--seed", type=int, default=time.time_ns() % 1_000_000)
    parser.add_argument("--until", metavar="HH:MM", help="start no sequence after this time of day")
    parser.add_argument("--keep-going", action="store_true", help="go on after a sequence with violations")
    parser.add_argument("--replay", metavar="STRING", help="run exactly this sequence (as printed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the sequences' folders (Drive, logs, the runs' objects) to read afterwards")
    parser.add_argument("--registry", default="http://127.0.0.1:5000", help="the local registry with the images")
    args = parser.parse_args()
    if args.replay:
        try:
            runs = [parse_replay(args.replay)]
        except ValueError as exc:
            parser.error(str(exc))
    else:
        master = random.Random(args.seed)
        runs = []
        for _ in range(args.sequences):
            seed = master.randrange(1 << 30)
            sequence_rng = random.Random(seed)
            runs.append((seed, draw_drive(sequence_rng), plan(sequence_rng, args.events)))
    stop_at = deadline_of(args.until)
    figures, began = Figures(), time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="mf-torture-", dir="/var/tmp"))
    base.chmod(0o755)
    say(f"seed {args.seed}: {len(runs)} sequence(s) in {base}")
    try:
        for number, (seed, drive, events) in enumerate(runs, 1):
            if stop_at is not None and time.time() > stop_at:
                say(f"--until {args.until} reached")
                break
            say(f"sequence {number}: {replay_string(seed, drive, events)}")
            sequence = Sequence(base / f"seq-{number}", args.registry, seed, drive, events, figures, say)
            found = sequence.run()
            figures.violations += found
            say(f"sequence {number}: {'FAILED' if found else 'ok'}; so far {figures.sequences} sequences, "
                f"{figures.events} events, {sum(figures.kills.values())} deaths, {figures.restores} restores, "
                f"{len(figures.violations)} violations")
            if found and not args.keep_going:
                break
            if number % 5 == 0:
                report(figures, began)
    finally:
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        report(figures, began)
    return 1 if figures.violations else 0


if __name__ == "__main__":
    sys.exit(main())
