#!/usr/bin/env python3
"""Soak test of snapshots: many rounds of "steady writes + watcher, SIGKILL everything at a random
instant, restore into a fresh folder, amcheck, gap-free counters".

    python scripts/soak_snapshots.py [--rounds 50] [--rate 30] [--max-wait 8] [--seed N]
                                     [--drive] [--latency 0.05] [--upload-delay 1] [--reorder 1]
    python scripts/soak_snapshots.py --metaflow [--drive ...] [--rounds 10] [--max-wait 20] [--registry URL]
                                     [--snapshot-every 3,10] [--after-run S]

With --drive the snapshot folder is on the Drive-like FUSE mount (tests/drivefs.py) with that
latency per operation and reordered uploads; the mount dies with everything else and the
restore reads a new mount of what was uploaded. Without --metaflow the write load is SQL (one
row and one sequence-drawn run id per transaction).

With --metaflow each round is the whole stack (production images from the local registry) with a
client running real flows back to back, all SIGKILLed at a random instant; a new machine (empty
PGDATA, same MF_ROOT) restores, the restored database must pass pg_amcheck, and the client's
successful runs must be a prefix of those that finished, with no run id handed out twice
(tests/helpers_soak.py). With --drive as well, the whole MF_ROOT is on the mount (as on Colab:
PGDATA and caches stay on local disk) and the new machine sees only what was uploaded.
--snapshot-every LOW,HIGH also takes a snapshot from another process at random intervals (each
makes the watcher start a new generation too), so kills land in the middle of generations.
--after-run S kills 0..S seconds after a run finished instead of at any instant: while the run's
last records are still being shipped and uploaded, where the loss window shows.

Prints restores succeeded, the data-loss window (commit time of the last committed row minus
that of the last restored row) median and max, and the restore time median. Needs root and
PostgreSQL 15 (apt-get install -y postgresql-15), and fuse3 for --drive.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers_pg import crash_round, make_workdir, require_pg15  # noqa: E402


def metaflow_soak(rounds: int, max_wait: float, seed: int, registry: str, drive: dict | None,
                  snapshot_every: tuple[float, float] | None, after_run: float | None) -> int:
    from tests.conftest import stack_flags
    from tests.helpers_soak import check_round, metaflow_round

    rng = random.Random(seed)
    base = make_workdir("mf-soak-metaflow-")
    where = (f"MF_ROOT on the Drive-like mount (latency {drive['latency'] * 1000:.0f} ms, upload delay "
             f"{drive['upload_delay']} s + 0..{drive['reorder']} s reordered)") if drive else "MF_ROOT on local disk"
    extra = f", snapshots every {snapshot_every[0]:g}..{snapshot_every[1]:g} s" if snapshot_every else ""
    when = f"0..{after_run:g} s after a run finished" if after_run is not None else f"within {max_wait:g} s"
    print(f"seed {seed}, {rounds} rounds of the whole stack with real runs, kill {when}, {where}"
          f"{extra}", flush=True)
    windows, failures, mid, started = [], 0, 0, time.monotonic()
    try:
        for number in range(1, rounds + 1):
            work = base / f"round-{number}"
            try:
                result = metaflow_round(work, stack_flags(work / "metaflow-stack", registry), rng,
                                        max_wait=max_wait, drive=drive, snapshot_every=snapshot_every,
                                        after_run=after_run)
                check_round(result)
            except Exception as exc:  # a failed round is a finding, not the end of the soak
                failures += 1
                print(f"round {number:3d}: FAILED {exc}", flush=True)
                traceback.print_exc()
                continue
            windows.append(result.loss_window_s)
            mid += result.mid_snapshot
            lost = len([run for run in result.finished if run not in result.restored])
            print(f"round {number:3d}: {len(result.finished)} runs finished, {len(result.restored)} restored "
                  f"({lost} lost), "
                  f"next run id {result.next_id}, loss window {result.loss_window_s:5.2f} s, amcheck clean"
                  f"{' (killed mid-snapshot)' if result.mid_snapshot else ''}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"rounds good: {len(windows)}/{rounds} ({time.monotonic() - started:.0f} s in all): restored, "
          f"pg_amcheck clean, runs a prefix of those finished, no run id reused")
    if windows:
        goal = 2.0 + (drive["upload_delay"] + drive["reorder"] if drive else 0.0)
        print(f"data-loss window: median {statistics.median(windows):.2f} s, max {max(windows):.2f} s "
              f"(goal <= {goal:.1f} s: 2 s plus the upload delay); killed mid-snapshot: {mid} round(s)")
    return 0 if not failures else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--rate", type=float, default=30.0, help="writer commits per second")
    parser.add_argument("--max-wait", type=float, default=8.0, help="kill up to this long after the first snapshot")
    parser.add_argument("--seed", type=int, default=time.time_ns() % 1_000_000)
    parser.add_argument("--drive", action="store_true", help="snapshot folder on the Drive-like FUSE mount")
    parser.add_argument("--latency", type=float, default=0.05, help="Drive: seconds per file operation")
    parser.add_argument("--upload-delay", type=float, default=1.0, help="Drive: seconds before an upload")
    parser.add_argument("--reorder", type=float, default=1.0, help="Drive: random extra upload delay, 0..S")
    parser.add_argument("--metaflow", action="store_true", help="the whole stack with real flows as the load")
    parser.add_argument("--registry", default="http://127.0.0.1:5000", help="--metaflow: the local registry")
    parser.add_argument("--snapshot-every", default="", metavar="LOW,HIGH",
                        help="--metaflow: also snapshot from another process every LOW..HIGH seconds")
    parser.add_argument("--after-run", type=float, default=None, metavar="S",
                        help="--metaflow: kill 0..S seconds after a run finished")
    args = parser.parse_args()
    drive = {"latency": args.latency, "upload_delay": args.upload_delay, "reorder": args.reorder} \
        if args.drive else None
    if args.metaflow:
        every = tuple(float(part) for part in args.snapshot_every.split(",")) if args.snapshot_every else None
        if every is not None and len(every) != 2:
            parser.error("--snapshot-every takes two numbers: LOW,HIGH (seconds)")
        return metaflow_soak(args.rounds, args.max_wait, args.seed, args.registry, drive, every, args.after_run)
    require_pg15()
    rng = random.Random(args.seed)
    base = make_workdir("mf-soak-")
    results, failures = [], []
    started = time.monotonic()
    where = (f"Drive-like mount (latency {args.latency * 1000:.0f} ms, upload delay {args.upload_delay} s "
             f"+ 0..{args.reorder} s reordered)") if drive else "a local folder"
    print(f"seed {args.seed}, {args.rounds} rounds, writer at {args.rate:.0f} commits/s, snapshots on {where}",
          flush=True)
    try:
        for number in range(1, args.rounds + 1):
            try:
                result = crash_round(base, rng, rate=args.rate, max_wait=args.max_wait, drive=drive)
            except Exception as exc:  # a failed round is a finding, not the end of the soak
                failures.append((number, exc))
                print(f"round {number:3d}: FAILED {exc}", flush=True)
                traceback.print_exc()
                continue
            results.append(result)
            print(f"round {number:3d}: restored {result.restored}/{result.committed} rows, loss window "
                  f"{result.loss_window_s:5.2f} s, restore {result.restore_s:5.2f} s, "
                  f"{result.generations_published} generations, generation {result.generation} + "
                  f"{result.wal_pieces} WAL pieces{' (killed mid-snapshot)' if result.mid_snapshot else ''}"
                  f"{'; skipped ' + str(result.skipped) if result.skipped else ''}"
                  f"{'; ' + result.wal_note if result.wal_note else ''}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"restores succeeded: {len(results)}/{args.rounds}  ({time.monotonic() - started:.0f} s in all)")
    if results:
        losses = [r.loss_window_s for r in results]
        goal = 2.0 + (args.upload_delay + args.reorder if drive else 0.0)
        print(f"data-loss window: median {statistics.median(losses):.2f} s, max {max(losses):.2f} s "
              f"(goal <= {goal:.1f} s: 2 s plus the upload delay)")
        print(f"killed mid-snapshot: {sum(r.mid_snapshot for r in results)} round(s); no run id reused; "
              f"generations skipped at restore: {sum(len(r.skipped) for r in results)}")
        print(f"restore time (restore + recovery to accepting connections): median "
              f"{statistics.median(r.restore_s for r in results):.2f} s, max {max(r.restore_s for r in results):.2f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
