"""Snapshots of a real PostgreSQL 15 to a plain folder standing in for Google Drive, and restores."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer import procs
from installer.errors import SnapshotError
from installer.snapshot import (SnapshotCache, WalChain, chain_after, check_destination, list_generations,
                                read_status, restore, ship_wal, take_snapshot)
from tests.helpers_pg import REPO, PgCluster, running_cluster, start_restored, start_watcher, wait_for


@pytest.fixture
def pg(workdir: Path) -> Iterator[PgCluster]:
    with running_cluster(workdir / "pgdata", "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL)") as cluster:
        yield cluster


def insert(cluster: PgCluster, *ids: int) -> None:
    with cluster.connect() as conn:
        for item in ids:
            conn.execute("INSERT INTO items VALUES (%s, %s)", (item, f"item {item}"))


def item_ids(cluster: PgCluster) -> list[int]:
    with cluster.connect() as conn:
        return [row[0] for row in conn.execute("SELECT id FROM items ORDER BY id")]


def manifests(dest: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in (dest / "generations").glob("*.json")}


def unreferenced_packs(dest: Path) -> set[str]:
    referenced = {location[0] for m in manifests(dest).values() for location in m["chunk_index"].values()}
    stored = {path.name for path in (dest / "packs").iterdir()}
    return stored - referenced


def test_snapshot_restores_to_the_state_at_the_snapshot(pg: PgCluster, dest: Path, workdir: Path) -> None:
    insert(pg, 1, 2, 3)
    generation = take_snapshot(pg.dsn, pg.datadir, dest)
    insert(pg, 4)  # after the snapshot: must not come back

    manifest = manifests(dest)[generation.id]
    with pg.connect() as conn:
        system_id = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]
    assert manifest["system_identifier"] == system_id
    assert manifest["pg_version"].startswith("15.")
    assert manifest["start_lsn"] == generation.start_lsn and manifest["stop_lsn"] == generation.stop_lsn
    assert "START WAL LOCATION" in manifest["backup_label"]
    paths = {entry["path"] for entry in manifest["files"]}
    assert "global/pg_control" in paths and "postmaster.pid" not in paths
    assert all(f"pg_wal/{segment}" in paths for segment in manifest["wal_segments"])
    assert all(len(entry["sha256"]) == 64 and entry["size"] >= 0 for entry in manifest["files"])

    restored, report = start_restored(workdir, dest)
    try:
        assert report.generation == generation.id and report.skipped == []
        assert item_ids(restored) == [1, 2, 3]
        restored.amcheck()
    finally:
        restored.stop()
    assert "consistent recovery state reached" in procs.tail(restored.log, 200)


def test_restored_folder_has_the_modes_postgresql_demands(pg: PgCluster, dest: Path, workdir: Path) -> None:
    take_snapshot(pg.dsn, pg.datadir, dest)
    target = workdir / "modes" / "pgdata"
    os.umask(0o022)
    restore(dest, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for root, dirs, files in os.walk(target):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o700, name
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name
    assert (target / "backup_label").is_file() and (target / "pg_wal" / "archive_status").is_dir()


def test_second_snapshot_uploads_only_what_changed(pg: PgCluster, dest: Path) -> None:
    with pg.connect() as conn:
        conn.execute("INSERT INTO items SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 100000) g")
    cache = SnapshotCache()
    first = take_snapshot(pg.dsn, pg.datadir, dest, cache=cache)
    insert(pg, 0)
    second = take_snapshot(pg.dsn, pg.datadir, dest, cache=cache)
    assert first.size > 50_000_000
    assert second.uploaded < first.uploaded / 4
    assert second.new_chunks < first.new_chunks / 4


def test_pruning_keeps_the_newest_n_and_their_chunks(pg: PgCluster, dest: Path, workdir: Path) -> None:
    ids = []
    for item in range(1, 5):
        insert(pg, item)
        ids.append(take_snapshot(pg.dsn, pg.datadir, dest, keep=2).id)
    listed = list_generations(dest, deep=True)
    assert [info.id for info in listed] == ids[:1:-1]
    assert all(info.ok for info in listed)
    assert unreferenced_packs(dest) == set()
    assert list((dest / "tmp").iterdir()) == []
    restored, report = start_restored(workdir, dest)
    try:
        assert report.generation == ids[-1] and item_ids(restored) == [1, 2, 3, 4]
    finally:
        restored.stop()


def test_corrupt_truncated_and_incomplete_generations_are_skipped(pg: PgCluster, dest: Path,
                                                                  workdir: Path) -> None:
    ids = []
    for item in range(1, 5):
        insert(pg, item)
        ids.append(take_snapshot(pg.dsn, pg.datadir, dest).id)
    g1, g2, g3, g4 = ids
    all_manifests = manifests(dest)

    def own_pack(gid: str) -> Path:
        others = {loc[0] for other, m in all_manifests.items() if other != gid for loc in m["chunk_index"].values()}
        mine = sorted({loc[0] for loc in all_manifests[gid]["chunk_index"].values()} - others)
        return dest / "packs" / mine[0]

    own_pack(g4).unlink()                               # a pack lost
    pack = own_pack(g3)                                 # a pack cut short (an upload not done)
    pack.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])
    manifest = dest / "generations" / f"{g2}.json"      # a manifest cut short
    manifest.write_bytes(manifest.read_bytes()[:500])

    deep = {info.id: info for info in list_generations(dest, deep=True)}
    assert [gid for gid, info in deep.items() if info.ok] == [g1]
    assert "missing" in deep[g4].reason and "truncated or damaged" in deep[g3].reason
    assert "incomplete" in list_generations(dest)[1].reason  # the quick check sees it by size
    assert "truncated" in deep[g2].reason

    restored, report = start_restored(workdir, dest)
    try:
        assert report.generation == g1
        assert [gid for gid, _ in report.skipped] == [g4, g3, g2]
        assert "missing" in report.skipped[0][1] and "incomplete" in report.skipped[1][1]
        assert item_ids(restored) == [1]
        restored.amcheck()
    finally:
        restored.stop()


def test_any_flipped_byte_in_a_pack_or_manifest_is_detected_and_an_older_generation_restored(
        pg: PgCluster, dest: Path, workdir: Path) -> None:
    insert(pg, 1)
    g1 = take_snapshot(pg.dsn, pg.datadir, dest).id
    insert(pg, 2)
    g2 = take_snapshot(pg.dsn, pg.datadir, dest).id
    all_manifests = manifests(dest)
    own = sorted({loc[0] for loc in all_manifests[g2]["chunk_index"].values()} -
                 {loc[0] for loc in all_manifests[g1]["chunk_index"].values()})
    assert own, "the second generation wrote no pack of its own"
    pack = dest / "packs" / own[0]
    manifest = dest / "generations" / f"{g2}.json"
    # Inside the pack: its first byte (a zlib header), the middle of the data, its last byte (a
    # checksum trailer), and a byte in the first and last chunk of the new ones at random depth.
    extents = sorted((offset, length) for name, offset, length, _ in all_manifests[g2]["chunk_index"].values()
                     if name == own[0])
    size = pack.stat().st_size
    offsets = {0, 1, size // 2, size - 1, extents[0][0] + extents[0][1] // 3,
               extents[-1][0] + extents[-1][1] * 2 // 3}
    targets = [(pack, offset) for offset in sorted(offsets)]
    targets += [(manifest, offset) for offset in (0, manifest.stat().st_size // 2, manifest.stat().st_size - 2)]
    for n, (path, offset) in enumerate(targets):
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        try:
            report = restore(dest, workdir / f"restore-{n}" / "pgdata")
        finally:
            path.write_bytes(original)
        assert report.generation == g1, f"a flipped bit at {path.name}:{offset} went unnoticed"
        assert [gid for gid, _ in report.skipped] == [g2], report.skipped
        why = report.skipped[0][1]
        assert ("damaged" in why or "checksum" in why) and (own[0] in why or "manifest" in why), why

    restored, report = start_restored(workdir, dest)  # everything put back: the newest again
    try:
        assert report.generation == g2 and report.skipped == [] and item_ids(restored) == [1, 2]
    finally:
        restored.stop()


def test_a_format_2_generation_restores_and_the_next_one_stores_its_chunks_again_with_checksums(
        pg: PgCluster, dest: Path, workdir: Path) -> None:
    from installer.snapshot.generations import manifest_checksum

    insert(pg, 1)
    old = take_snapshot(pg.dsn, pg.datadir, dest)
    path = dest / "generations" / f"{old.id}.json"
    manifest = json.loads(path.read_text())  # as an earlier version wrote it: no checksum of stored bytes
    manifest["format"] = 2
    manifest["chunk_index"] = {digest: location[:3] for digest, location in manifest["chunk_index"].items()}
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))
    report = restore(dest, workdir / "from-format-2" / "pgdata")
    assert report.generation == old.id and report.skipped == []

    old_packs = {location[0] for location in manifest["chunk_index"].values()}
    new = take_snapshot(pg.dsn, pg.datadir, dest)
    index = manifests(dest)[new.id]["chunk_index"]
    assert manifests(dest)[new.id]["format"] == 3 and all(len(location) == 4 for location in index.values())
    assert not old_packs & {location[0] for location in index.values()}, "chunks without checksums reused"
    assert new.new_chunks == len(index)


def test_restore_with_nothing_usable_names_every_reason(pg: PgCluster, dest: Path, workdir: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot found"):
        restore(dest, workdir / "empty-dest-restore")
    gid = take_snapshot(pg.dsn, pg.datadir, dest).id
    (dest / "generations" / f"{gid}.json").write_text("{")
    with pytest.raises(SnapshotError, match=f"{gid}: manifest is truncated"):
        restore(dest, workdir / "nothing-good")
    assert not (workdir / "nothing-good").exists()


def test_non_empty_data_folder_is_refused_without_force(pg: PgCluster, dest: Path, workdir: Path) -> None:
    insert(pg, 7)
    take_snapshot(pg.dsn, pg.datadir, dest)
    target = workdir / "occupied" / "pgdata"
    target.mkdir(parents=True)
    (target / "precious").write_text("keep me")
    with pytest.raises(SnapshotError, match="not empty") as caught:
        restore(dest, target)
    assert "force" in (caught.value.hint or "")
    assert (target / "precious").read_text() == "keep me" and len(list(target.iterdir())) == 1

    with pytest.raises(SnapshotError, match="is running on it"):
        restore(dest, pg.datadir, force=True)  # never pull the folder from under a live server
    assert (pg.datadir / "postmaster.pid").is_file()

    report = restore(dest, target, force=True)
    assert report.replaced is not None and report.replaced.name.startswith("pgdata.replaced-")
    assert (report.replaced / "precious").read_text() == "keep me"
    assert (target / "PG_VERSION").is_file() and not (target / "precious").exists()


def test_killed_snapshot_publishes_nothing_and_is_cleaned_next_time(pg: PgCluster, dest: Path,
                                                                    workdir: Path) -> None:
    insert(pg, 1)
    first = take_snapshot(pg.dsn, pg.datadir, dest)
    with pg.connect() as conn:  # ~150 MB so that the copy takes long enough to be caught mid-way
        conn.execute("INSERT INTO items SELECT g, md5(random()::text) || md5(random()::text) "
                     "FROM generate_series(2, 1500000) g")
    packs_before = set((dest / "packs").iterdir())
    code = "import sys; from installer.snapshot import take_snapshot; take_snapshot(*sys.argv[1:4])"
    pid = procs.spawn([sys.executable, "-c", code, pg.dsn, str(pg.datadir), str(dest)],
                      log_path=workdir / "snapshot-proc.log", cwd=REPO)
    wait_for(lambda: any(p.stat().st_size > 5_000_000 for p in set((dest / "packs").iterdir()) - packs_before), 60,
             "the snapshot process to be mid-copy", poll=0.005)
    procs.send(pid, signal.SIGKILL)
    assert procs.wait_gone([pid], 10) == []

    assert [info.id for info in list_generations(dest)] == [first.id]
    assert unreferenced_packs(dest), "the killed snapshot should have left a pack behind"
    restored, report = start_restored(workdir, dest)
    try:
        assert report.generation == first.id and item_ids(restored) == [1]
    finally:
        restored.stop()

    second = take_snapshot(pg.dsn, pg.datadir, dest)
    assert [info.id for info in list_generations(dest)] == [second.id, first.id]
    assert list((dest / "tmp").iterdir()) == []
    assert unreferenced_packs(dest) == set()


def test_check_destination_explains_what_is_wrong(workdir: Path) -> None:
    afile = workdir / "afile"
    afile.write_text("x")
    with pytest.raises(SnapshotError, match="not a directory"):
        check_destination(afile)
    with pytest.raises(SnapshotError, match="does not exist"):
        check_destination(workdir / "missing" / "snapshots", create=True)
    assert check_destination(workdir / "made", create=True).is_dir()

    drive = workdir / "content" / "drive"
    drive.mkdir(parents=True)  # the mount point exists, but Drive is not mounted on it
    with pytest.raises(SnapshotError, match="Google Drive does not look mounted") as caught:
        check_destination(drive / "MyDrive" / "metaflow" / "snapshots", create=True)
    assert "local" in (caught.value.hint or "")
    assert not (drive / "MyDrive").exists()

    readonly = workdir / "readonly"
    readonly.mkdir()
    procs.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], what="mount a read-only tmpfs")
    try:
        with pytest.raises(SnapshotError, match="not writable"):
            check_destination(readonly)
        assert check_destination(readonly, writable=False) == readonly
    finally:
        procs.run(["umount", str(readonly)], what="umount")


def test_watcher_snapshots_changes_ignores_idle_and_survives_kill(pg: PgCluster, dest: Path,
                                                                 workdir: Path) -> None:
    status_file = workdir / "state" / "snapshot-status.json"
    status_file.parent.mkdir()
    assert read_status(status_file) is None
    out = workdir / "watcher.log"
    # A short heartbeat: the idle checks below must reach the status file within the 10 s.
    watcher = start_watcher(pg.datadir, dest, pg.dsn, status_file, out, debounce=0.5, max_delay=2, heartbeat=2)
    try:
        wait_for(lambda: len(list_generations(dest)) == 1, 60, "the watcher's first snapshot")
        insert(pg, 1, 2)  # shipped as a WAL piece after the first generation, not as a new generation
        wait_for(lambda: (s := read_status(status_file)) and s.wal_pieces == 1, 60, "WAL shipped after the insert")
        wait_for(lambda: (read_status(status_file) or None) and read_status(status_file).state == "watching",
                 30, "the watcher to settle")
        before = read_status(status_file)
        assert before is not None and before.snapshots == 1 and before.last_error is None
        assert len(list_generations(dest)) == 1 and len(list((dest / "wal" / before.last_id).iterdir())) == 1
        assert before.last_id == list_generations(dest)[0].id and before.age_s is not None

        # Idle for 10 s, but with PostgreSQL writing files and WAL (a checkpoint): no snapshot.
        with pg.connect() as conn:
            lsn_before = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
            conn.execute("CHECKPOINT")
            time.sleep(10)
            lsn_after = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        after = read_status(status_file)
        assert lsn_after != lsn_before
        assert after is not None and after.wakeups > before.wakeups and after.checks > before.checks
        assert after.snapshots == 1 and after.wal_pieces == 1 and len(list_generations(dest)) == 1, procs.tail(out)

        # Killed and restarted: it finds nothing to do, then snapshots the next change.
        procs.send(watcher, signal.SIGKILL)
        procs.wait_gone([watcher], 10)
        watcher = start_watcher(pg.datadir, dest, pg.dsn, status_file, out, debounce=0.5, max_delay=2)
        wait_for(lambda: read_status(status_file).pid == watcher and read_status(status_file).checks > 0, 30,
                 "the restarted watcher's first check")
        assert len(list_generations(dest)) == 1
        insert(pg, 3)  # the old chain's slot died with the old watcher: a new generation
        wait_for(lambda: len(list_generations(dest)) == 2, 60, "a snapshot by the restarted watcher")

        procs.send(watcher, signal.SIGTERM)
        assert procs.wait_gone([watcher], 20) == []
        final = read_status(status_file)
        assert final is not None and final.state == "stopped" and final.snapshots == 1
    finally:
        procs.kill_tree([watcher])

    restored, _ = start_restored(workdir, dest)
    try:
        assert item_ids(restored) == [1, 2, 3]
    finally:
        restored.stop()


@pytest.mark.parametrize("stop_lands", ["after the publish", "before the publish"])
def test_watcher_stopped_mid_snapshot_counts_only_what_it_published(pg: PgCluster, dest: Path, workdir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     stop_lands: str) -> None:
    """SIGTERM raises inside whatever the watcher is doing; one that lands after the manifest is published
    (while old generations are pruned, or before the watcher's bookkeeping) must still count it."""
    from installer import watcher as watcher_module

    dsn_file = workdir / "dsn"
    dsn_file.write_text(pg.dsn + "\n")
    status_file = workdir / "snapshot-status.json"
    watcher = watcher_module.Watcher(pg.datadir, dest, dsn_file, status_file)
    assert watcher.check_and_snapshot() and watcher.status.snapshots == 1  # the first generation, booked
    first = watcher.status.last_id
    insert(pg, 1)
    watcher.chain = None  # a new generation this time, not a WAL piece

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if stop_lands == "after the publish":
            take_snapshot(*args, **kwargs)
        raise watcher_module._Stop()

    monkeypatch.setattr(watcher_module, "take_snapshot", interrupted)
    with pytest.raises(watcher_module._Stop):
        watcher.check_and_snapshot()
    watcher.stopped()
    watcher.conn.close()

    final = read_status(status_file)
    generations = [g.id for g in list_generations(dest)]
    assert final is not None and final.state == "stopped"
    if stop_lands == "after the publish":
        assert len(generations) == 2 and generations[0] != first
        assert final.snapshots == 2 and final.last_id == generations[0] and final.last_error is None
    else:
        assert generations == [first]
        assert final.snapshots == 1 and final.last_id == first


def test_watcher_rewrites_its_status_file_only_when_what_it_says_changes(pg: PgCluster, dest: Path,
                                                                          workdir: Path) -> None:
    """The status file lives under MF_ROOT, on Drive on Colab, where each rewrite is an upload."""
    status_file = workdir / "state" / "snapshot-status.json"
    status_file.parent.mkdir()
    out = workdir / "watcher.log"
    watcher = start_watcher(pg.datadir, dest, pg.dsn, status_file, out, heartbeat=4)
    try:
        wait_for(lambda: (s := read_status(status_file)) and s.snapshots == 1 and s.state == "watching", 60,
                 "the watcher's first snapshot")
        time.sleep(1)
        before = read_status(status_file)

        # 12 s idle, PostgreSQL writing files at a checkpoint every 2 s: the watcher checks each time,
        # and only the heartbeat (every 4 s) may rewrite the file.
        def version() -> tuple[int, int]:
            info = os.stat(status_file)
            return info.st_ino, info.st_mtime_ns

        seen, rewrites = version(), 0
        end, next_checkpoint = time.monotonic() + 12, 0.0
        with pg.connect() as conn:
            while time.monotonic() < end:
                if time.monotonic() >= next_checkpoint:
                    conn.execute("CHECKPOINT")
                    next_checkpoint = time.monotonic() + 2
                if version() != seen:
                    seen, rewrites = version(), rewrites + 1
                time.sleep(0.02)
        after = read_status(status_file)
        assert after is not None and before is not None
        assert after.checks - before.checks >= 4, (before, after, procs.tail(out))
        assert 1 <= rewrites <= 4, f"{rewrites} rewrites for {after.checks - before.checks} idle checks"
        assert after.snapshots == 1 and after.wal_pieces == 0 and after.state == "watching"

        # A change of what it says is written at once, not at the next heartbeat.
        insert(pg, 1)
        committed = time.monotonic()
        wait_for(lambda: read_status(status_file).wal_pieces == 1, 10, "the WAL piece in the status file")
        assert time.monotonic() - committed < 3.5
    finally:
        procs.kill_tree([watcher])


def ship(pg: PgCluster, dest: Path, chain: WalChain) -> None:
    with pg.connect() as conn:
        current = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        assert ship_wal(conn, pg.datadir, dest, chain, current) > 0


def test_wal_pieces_are_replayed_up_to_the_first_gap(pg: PgCluster, dest: Path, workdir: Path) -> None:
    with pg.connect() as conn:
        segment, timeline = conn.execute("SELECT (SELECT setting::int FROM pg_settings WHERE name = "
                                         "'wal_segment_size'), (SELECT timeline_id FROM pg_control_checkpoint())"
                                         ).fetchone()
        conn.execute("SELECT pg_create_physical_replication_slot('pin', true, false)")
    generation = take_snapshot(pg.dsn, pg.datadir, dest)
    chain = chain_after(generation, segment, timeline)
    for item in (1, 2, 3):
        insert(pg, item)
        ship(pg, dest, chain)
    pieces = sorted((dest / "wal" / generation.id).iterdir())
    assert len(pieces) == 3

    restored, report = start_restored(workdir, dest, "all-pieces")
    try:
        assert report.generation == generation.id and report.wal_pieces == 3 and report.wal_note is None
        assert item_ids(restored) == [1, 2, 3]
        restored.amcheck()
    finally:
        restored.stop()

    pieces[1].write_bytes(pieces[1].read_bytes()[:40])  # its name arrived, its content not yet
    restored, report = start_restored(workdir, dest, "gap")
    try:
        assert report.wal_pieces == 1 and "truncated" in report.wal_note and "1 later piece" in report.wal_note
        assert item_ids(restored) == [1]
    finally:
        restored.stop()
