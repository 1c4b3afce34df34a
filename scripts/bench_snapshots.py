#!/usr/bin/env python3
"""Benchmark snapshots on a real PostgreSQL 15: time and bytes written for databases of about
10 MB, 100 MB and 1 GB (first full snapshot, then incremental ones after a one-row change), and
the write-to-published latency through the watcher.

    python scripts/bench_snapshots.py [--sizes 10,100,1000] [--latency-samples 3] [--latency 0.05]

Each size runs twice: the destination a plain local folder, then the Drive-like FUSE mount
(tests/drivefs.py, `--latency` seconds per file operation). On the mount, the round trips of
each snapshot and of a restore are counted. Upload time to Google is not included.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from installer import procs  # noqa: E402
from installer.snapshot import SnapshotCache, list_generations, read_status, restore, take_snapshot  # noqa: E402
from tests.drivefs import DriveMount  # noqa: E402
from tests.helpers_pg import PgCluster, make_workdir, require_pg15, start_watcher, wait_for  # noqa: E402


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fill(cluster: PgCluster, megabytes: int) -> None:
    # Rows of ~250 bytes of mixed text: compresses about like real metadata does.
    rows = megabytes * 1024 * 1024 // 330
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE payload (id bigint PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO payload SELECT g, md5(g::text) || repeat(' step ' || (g %% 97)::text, 20) "
                     "|| md5((g * 7)::text) FROM generate_series(1, %s) g", (rows,))
        conn.execute("VACUUM ANALYZE payload")


def one_row(cluster: PgCluster, value: int) -> float:
    with cluster.connect() as conn:
        conn.execute("UPDATE payload SET body = 'changed' || %s WHERE id = 1", (str(value),))
    return time.time()


def mb(n: float) -> str:
    return f"{n / 1e6:8.1f} MB"


def round_trips(mount: DriveMount | None) -> str:
    if mount is None:
        return ""
    stats = mount.stats()
    mount.reset_stats()
    return f", {stats['round_trips']} round trips"


def bench(megabytes: int, samples: int, latency: float | None) -> None:
    work = make_workdir("mf-bench-")
    cluster = PgCluster.initdb(work / "pgdata")
    cluster.start()
    watcher = None
    mount = None
    try:
        fill(cluster, megabytes)
        if latency is None:
            dest = work / "drive"
        else:
            mount = DriveMount(work / "mnt", work / "google", latency=latency, upload_delay=1, reorder=1).start()
            dest = mount.mountpoint / "snapshots"
        dest.mkdir()
        cache = SnapshotCache()
        where = "local folder" if mount is None else f"Drive-like mount, {latency * 1000:.0f} ms per operation"
        round_trips(mount)
        full = take_snapshot(cluster.dsn, cluster.datadir, dest, cache=cache)
        print(f"\n== about {megabytes} MB of table data on a {where}: data folder snapshot {mb(full.size)} "
              f"({full.files} files, {full.wal_segments} WAL segment)")
        print(f"full snapshot          {full.duration_s:6.2f} s, written {mb(full.uploaded)}{round_trips(mount)}")
        time.sleep(2.5)  # files written by the first snapshot's checkpoint become cacheable after 2 s
        for label in ("incremental (1st)", "incremental (next)"):
            one_row(cluster, 1)
            gen = take_snapshot(cluster.dsn, cluster.datadir, dest, cache=cache)
            print(f"{label:22s} {gen.duration_s:6.2f} s, written {mb(gen.uploaded)} ({gen.new_chunks} new chunks)"
                  f"{round_trips(mount)}")
            time.sleep(2.5)
        print(f"destination after 3 generations: {mb(du(dest))} in {sum(1 for _ in dest.rglob('*'))} entries")
        started = time.monotonic()
        report = restore(dest, work / "restored" / "pgdata")
        print(f"restore                {time.monotonic() - started:6.2f} s, {mb(report.size)}{round_trips(mount)}")
        shutil.rmtree(work / "restored")

        status = work / "status.json"
        watcher = start_watcher(cluster.datadir, dest, cluster.dsn, status, work / "watcher.log")
        wait_for(lambda: (s := read_status(status)) and s.checks > 0 and s.state == "watching", 120,
                 "the watcher to settle")
        latencies = []
        for sample in range(samples):
            before = read_status(status)
            count = before.snapshots + before.wal_pieces
            committed = one_row(cluster, 100 + sample)
            done = wait_for(lambda: (s := read_status(status)) and s.snapshots + s.wal_pieces > count and s, 300,
                            "the change to be published")
            latencies.append(max(done.last_at or 0, done.last_wal_at or 0) - committed)
            time.sleep(1.5)
        print(f"write-to-published latency (watcher: generation, or WAL piece): median {statistics.median(latencies):.2f} s, "
              f"max {max(latencies):.2f} s over {samples}")
        assert list_generations(dest)[0].ok
    finally:
        if watcher is not None:
            procs.kill_tree([watcher])
        if mount is not None:
            mount.kill()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="table data sizes in MB, comma-separated")
    parser.add_argument("--latency-samples", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="Drive-like mount: seconds per file operation")
    args = parser.parse_args()
    require_pg15()
    for size in (int(s) for s in args.sizes.split(",")):
        bench(size, args.latency_samples, None)
        bench(size, args.latency_samples, args.latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
