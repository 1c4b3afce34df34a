#!/usr/bin/env python3
"""Soak test of snapshots: many rounds of "steady writes + watcher, SIGKILL everything at a random
instant, restore into a fresh folder, amcheck, gap-free counters".

    python scripts/soak_snapshots.py [--rounds 50] [--rate 30] [--max-wait 8] [--seed N]
                                     [--drive] [--latency 0.05] [--upload-delay 1] [--reorder 1]

With --drive the snapshot folder is on the Drive-like FUSE mount (tests/drivefs.py) with that
latency per operation and reordered uploads; the mount dies with everything else and the
restore reads a new mount of what was uploaded. The write load is SQL (one row and one
sequence-drawn run id per transaction), not Metaflow runs.

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
    args = parser.parse_args()
    require_pg15()
    rng = random.Random(args.seed)
    base = make_workdir("mf-soak-")
    results, failures = [], []
    started = time.monotonic()
    drive = {"latency": args.latency, "upload_delay": args.upload_delay, "reorder": args.reorder} \
        if args.drive else None
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
