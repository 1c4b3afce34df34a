"""Taking a snapshot: PostgreSQL's low-level backup API in one session, data files into packs,
the manifest published last."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from ..errors import SnapshotError
from .destination import check_destination, dest_error, dest_lock, fsync_dir, write_durably
from .generations import DEFAULT_KEEP, collect_garbage, list_generations, manifest_checksum, prune
from .packs import CHUNK_SIZE, PackWriter
from .pg import connect, wal_segments


FORMAT = 3


LABEL = "metaflow-stack snapshot"


# Server settings snapshots depend on (the stack passes them as `-c name=value`).
REQUIRED_SETTINGS: dict[str, str] = {
    "wal_level": "replica",          # 'minimal' forbids online backups
    "full_page_writes": "on",        # torn pages in the copy are repaired from WAL full-page images
    "max_replication_slots": "10",   # one temporary slot per snapshot in progress (>= 1)
    "archive_mode": "off",           # generations carry their own WAL
    "max_wal_size": "256MB",         # bounds local pg_wal; each snapshot checkpoints anyway
}


# Directories whose contents PostgreSQL rebuilds or must not get back (kept empty in a copy).
_EMPTY_DIRS = ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
               "pg_snapshots", "pg_stat_tmp", "pg_subtrans")


_SKIP_FILES = {"postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old", "tablespace_map",
               "tablespace_map.old", "backup_manifest", "recovery.signal", "standby.signal",
               "postgresql.auto.conf.tmp", "current_logfiles.tmp", "pg_internal.init"}


# A cached file hash is trusted only if the file had been quiet this long before it was read
# (file timestamps are coarse: a write right after a read can leave mtime unchanged).
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Generation:
    """A snapshot just published."""
    id: str
    created: float
    size: int            # bytes of the PostgreSQL files it holds
    uploaded: int        # bytes written to the destination for it (new compressed chunks + manifest)
    new_chunks: int
    files: int
    wal_segments: int
    start_lsn: str
    stop_lsn: str
    duration_s: float
    xact_snapshot: str   # pg_current_snapshot() just before the stop: what "nothing changed" compares to
    pruned: tuple[str, ...] = ()


class SnapshotCache:
    """Per-file chunk lists from earlier snapshots, so unchanged files are not read again."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], int, str, list[str]]] = {}

    def get(self, rel: str, key: tuple[int, ...]) -> tuple[int, str, list[str]] | None:
        entry = self._entries.get(rel)
        return entry[1:] if entry is not None and entry[0] == key else None

    def put(self, rel: str, key: tuple[int, ...], size: int, digest: str, chunks: list[str]) -> None:
        self._entries[rel] = (key, size, digest, chunks)


def _walk_data(pgdata: Path) -> tuple[list[str], list[str]]:
    """(directories, files) of the data folder worth copying, relative paths."""
    dirs: set[str] = set(_EMPTY_DIRS)
    files: list[str] = []
    tablespaces = [name for name in os.listdir(pgdata / "pg_tblspc")] if (pgdata / "pg_tblspc").is_dir() else []
    if tablespaces:
        raise SnapshotError(f"{pgdata} uses tablespaces ({', '.join(tablespaces)}), which snapshots do not support",
                            hint="keep every table in the default tablespace")
    for root, dirnames, filenames in os.walk(pgdata):
        rel = os.path.relpath(root, pgdata)
        rel = "" if rel == "." else rel
        if rel:
            dirs.add(rel)
        if rel in _EMPTY_DIRS:
            dirnames[:] = []
            continue
        dirnames[:] = [name for name in dirnames if not name.startswith("pgsql_tmp")]
        for name in filenames:
            if name in _SKIP_FILES or name.startswith("pgsql_tmp"):
                continue
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                files.append(os.path.join(rel, name) if rel else name)
    return sorted(dirs), sorted(files)


def _store_file(store: PackWriter, path: Path, rel: str, cache: SnapshotCache | None) -> dict[str, Any] | None:
    """Chunk one file into the store; None if it vanished (a dropped relation: WAL replay knows)."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return None
    key = (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino)
    if cache is not None:
        hit = cache.get(rel, key)
        if hit is not None and all([store.has(digest) for digest in hit[2]]):
            return {"path": rel, "size": hit[0], "sha256": hit[1], "chunks": list(hit[2])}
    read_start = time.time_ns()
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    try:
        with open(path, "rb") as handle:
            while True:
                raw = handle.read(CHUNK_SIZE)
                if not raw:
                    break
                whole.update(raw)
                size += len(raw)
                chunks.append(store.put(raw))
        after = os.stat(path)
    except FileNotFoundError:
        return None
    digest = whole.hexdigest()
    quiet = max(before.st_mtime_ns, before.st_ctime_ns) < read_start - _RACY_NS
    if cache is not None and quiet and size == before.st_size and \
            (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == key:
        cache.put(rel, key, size, digest, chunks)
    return {"path": rel, "size": size, "sha256": digest, "chunks": chunks}


def _control_system_identifier(pgdata: Path) -> int:
    # ControlFileData starts with the 64-bit system identifier, in the machine's byte order.
    with open(pgdata / "global" / "pg_control", "rb") as handle:
        return struct.unpack("=Q", handle.read(8))[0]


def generation_id_at(when: float) -> str:
    """The id a generation created at unix time `when` gets (ids sort by creation time)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def _new_generation_id(generations: Path) -> str:
    base = generation_id_at(time.time())
    candidate, n = base, 1
    while (generations / f"{candidate}.json").exists():
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def take_snapshot(dsn: str, pgdata: Path | str, dest: Path | str, keep: int = DEFAULT_KEEP, *,
                  cache: SnapshotCache | None = None, lock_timeout: float = 600.0) -> Generation:
    """Take a consistent snapshot of the running server whose data folder is `pgdata`, publish
    it in `dest`, then keep only the newest `keep` generations."""
    if keep < 1:
        raise SnapshotError(f"keep must be at least 1 (got {keep})")
    pgdata = Path(pgdata)
    if not (pgdata / "PG_VERSION").is_file():
        raise SnapshotError(f"{pgdata} is not a PostgreSQL data folder (no PG_VERSION)",
                            hint="check PGDATA_DIR")
    dest = check_destination(dest, create=True)
    started = time.monotonic()
    with dest_lock(dest, lock_timeout):
        store = PackWriter(dest)
        published = False
        try:
            store.prepare(info.manifest for info in list_generations(dest) if info.ok and info.manifest)
            with connect(dsn) as conn:
                manifest = _copy(conn, pgdata, store, cache)
            store.close_pack()
            manifest["chunk_index"] = dict(sorted(store.used.items()))
            manifest["manifest_sha256"] = manifest_checksum(manifest)
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            part = store.tmp / f"{manifest['id']}.json.part"
            write_durably(part, data)
            if part.read_bytes() != data:
                raise OSError(errno.EIO, f"manifest {part} did not read back as written")
            os.replace(part, store.generations / f"{manifest['id']}.json")
            fsync_dir(store.generations)
            published = True
        except OSError as exc:
            raise dest_error(dest, exc) from exc
        except psycopg.Error as exc:
            raise SnapshotError(f"PostgreSQL failed during the snapshot: {str(exc).strip()}",
                                hint="see the database log; the previous snapshot is intact") from exc
        finally:
            try:
                store.close_pack()
                store.clear_tmp()
                if not published:
                    collect_garbage(dest)  # frees what a failed attempt left, e.g. on a full drive
            except OSError:
                pass
        try:
            pruned = prune(dest, keep)
        except OSError:
            pruned = []  # retried after the next snapshot; the new generation is published regardless
    return Generation(id=manifest["id"], created=manifest["created"], size=manifest["size"],
                      uploaded=store.uploaded + len(data), new_chunks=store.new_chunks,
                      files=len(manifest["files"]), wal_segments=len(manifest["wal_segments"]),
                      start_lsn=manifest["start_lsn"], stop_lsn=manifest["stop_lsn"],
                      duration_s=time.monotonic() - started, xact_snapshot=manifest["xact_snapshot"],
                      pruned=tuple(pruned))


def _copy(conn: psycopg.Connection[Any], pgdata: Path, store: PackWriter,
          cache: SnapshotCache | None) -> dict[str, Any]:
    facts = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " (SELECT system_identifier FROM pg_control_system())::text,"
        " current_setting('wal_level'), current_setting('full_page_writes'),"
        " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')").fetchone()
    assert facts is not None
    version, version_num, system_id, wal_level, fpw, segment_size = facts
    if wal_level == "minimal" or fpw != "on":
        raise SnapshotError(f"PostgreSQL runs with wal_level={wal_level}, full_page_writes={fpw}: "
                            "online snapshots need wal_level=replica and full_page_writes=on",
                            hint="start PostgreSQL with " +
                                 " ".join(f"-c {k}={v}" for k, v in REQUIRED_SETTINGS.items()))
    if str(_control_system_identifier(pgdata)) != system_id:
        raise SnapshotError(f"{pgdata} is not the data folder of the server the DSN points at "
                            "(system identifiers differ)", hint="check PGDATA_DIR and the database port")
    slot = f"mf_snapshot_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
    except psycopg.Error as exc:
        raise SnapshotError(f"cannot create a temporary replication slot: {str(exc).strip()}",
                            hint="start PostgreSQL with -c max_replication_slots=10 -c wal_level=replica") from exc
    created = time.time()
    row = conn.execute("SELECT pg_backup_start(%s, fast => true)::text", (LABEL,)).fetchone()
    assert row is not None
    start_lsn = row[0]
    dirs, names = _walk_data(pgdata)
    files = [entry for entry in (_store_file(store, pgdata / rel, rel, cache) for rel in names) if entry]
    # Taken before the stop: every transaction it shows as finished is inside this snapshot.
    xact_row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    stop = conn.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(wait_for_archive => false)"
                        ).fetchone()
    assert xact_row is not None and stop is not None
    stop_lsn, labelfile, spcmapfile = stop
    timeline = int(next(line.split(":")[1] for line in labelfile.splitlines() if line.startswith("START TIMELINE")))
    segments = wal_segments(timeline, start_lsn, stop_lsn, segment_size)
    wal_names = [f"pg_wal/{name}" for name in segments]
    if timeline > 1:
        wal_names += sorted(f"pg_wal/{name}" for name in os.listdir(pgdata / "pg_wal") if name.endswith(".history"))
    for rel in wal_names:
        entry = _store_file(store, pgdata / rel, rel, None)
        if entry is None:
            raise SnapshotError(f"WAL segment {rel} vanished during the snapshot",
                                hint="this should not happen while the snapshot's replication slot exists; retry")
        files.append(entry)
    manifest: dict[str, Any] = {
        "format": FORMAT, "id": _new_generation_id(store.generations), "created": created,
        "finished": time.time(), "pg_version": version, "pg_version_num": version_num,
        "system_identifier": system_id, "timeline": timeline, "start_lsn": start_lsn, "stop_lsn": stop_lsn,
        "backup_label": labelfile, "tablespace_map": spcmapfile or "", "xact_snapshot": xact_row[0],
        "chunk_size": CHUNK_SIZE, "dirs": dirs, "files": files, "wal_segments": segments,
        "wal_segment_size": segment_size, "size": sum(entry["size"] for entry in files),
    }
    return manifest
