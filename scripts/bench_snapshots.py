#!/usr/bin/env python3
"""Benchmark snapshots on a real PostgreSQL 15: time and bytes written for databases of about
10 MB, 100 MB and 1 GB (first full snapshot, then incremental ones after a one-row change), and
the write-to-published latency through the watcher.

    python scripts/bench_snapshots.py [--sizes 10,100,1000] [--latency-samples 3] [--latency 0.05]

Each size runs twice: the destination a plain local folder, then the Drive-like FUSE mount
(tests/drivefs.py, `--latency` seconds per file operation). On the mount, the round trips of
each snapshot and of a restore are counted (file operations that cost Drive a round trip; a
plain folder has no layer to count them in). Upload time to Google is not included. A table of
every size and destination ends the output.
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


def trips(mount: DriveMount | None) -> int | None:
    if mount is None:
        return None
    count = mount.stats()["round_trips"]
    mount.reset_stats()
    return count


def bench(megabytes: int, samples: int, latency: float | None) -> dict:
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
        trips(mount)
        full = take_snapshot(cluster.dsn, cluster.datadir, dest, cache=cache)
        row: dict = {"size": megabytes, "where": "local folder" if mount is None else "Drive-like mount",
                     "data": full.size, "full_s": full.duration_s, "full_written": full.uploaded,
                     "full_ops": trips(mount), "incr_s": [], "incr_written": [], "incr_ops": []}
        print(f"\n== about {megabytes} MB of table data on a {where}: data folder snapshot {mb(full.size)} "
              f"({full.files} files, {full.wal_segments} WAL segment)")
        print(f"full snapshot          {full.duration_s:6.2f} s, written {mb(full.uploaded)}"
              f"{_ops(row['full_ops'])}")
        time.sleep(2.5)  # files written by the first snapshot's checkpoint become cacheable after 2 s
        for label in ("incremental (1st)", "incremental (next)"):
            one_row(cluster, 1)
            gen = take_snapshot(cluster.dsn, cluster.datadir, dest, cache=cache)
            ops = trips(mount)
            row["incr_s"].append(gen.duration_s)
            row["incr_written"].append(gen.uploaded)
            row["incr_ops"].append(ops)
            print(f"{label:22s} {gen.duration_s:6.2f} s, written {mb(gen.uploaded)} ({gen.new_chunks} new chunks)"
                  f"{_ops(ops)}")
            time.sleep(2.5)
        print(f"destination after 3 generations: {mb(du(dest))} in {sum(1 for _ in dest.rglob('*'))} entries")
        started = time.monotonic()
        report = restore(dest, work / "restored" / "pgdata")
        row["restore_s"], row["restore_ops"] = time.monotonic() - started, trips(mount)
        print(f"restore                {row['restore_s']:6.2f} s, {mb(report.size)}{_ops(row['restore_ops'])}")
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
        row["published_s"] = statistics.median(latencies)
        assert list_generations(dest)[0].ok
        return row
    finally:
        if watcher is not None:
            procs.kill_tree([watcher])
        if mount is not None:
            mount.kill()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def _ops(count: int | None) -> str:
    return "" if count is None else f", {count} round trips"


def table(rows: list[dict]) -> str:
    def ops(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines = ["| table data | destination | data folder | full snapshot | incremental (1st / next) | restore | "
             "write to published |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        incr = " / ".join(f"{s:.2f} s" for s in r["incr_s"])
        incr_ops = " / ".join(ops(o) for o in r["incr_ops"])
        lines.append(f"| {r['size']} MB | {r['where']} | {r['data'] / 1e6:.0f} MB | {r['full_s']:.2f} s, "
                     f"{r['full_written'] / 1e6:.1f} MB written, {ops(r['full_ops'])} round trips | {incr}, "
                     f"{incr_ops} round trips | {r['restore_s']:.2f} s, {ops(r['restore_ops'])} round trips | "
                     f"median {r['published_s']:.2f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="table data sizes in MB, comma-separated")
    parser.add_argument("--latency-samples", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="Drive-like mount: seconds per file operation")
    args = parser.parse_args()
    require_pg15()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.append(bench(size, args.latency_samples, None))
        rows.append(bench(size, args.latency_samples, args.latency))
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
