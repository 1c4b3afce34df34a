"""Crash-consistent snapshots of PostgreSQL's data folder, published to a folder (Google Drive) and restored.

Why PostgreSQL's low-level backup API and not WAL archiving: a snapshot taken between
`pg_backup_start` and `pg_backup_stop` in one session, together with the WAL written in
between and the returned backup_label, is what PostgreSQL itself promises to recover
into a consistent state, whatever the copied files looked like mid-write. Each
generation is self-contained (restore needs no restore_command, no archive chain and no
server setting beyond the defaults), while archiving would need `archive_mode` fixed at
server start and would ship a 16 MB segment per switch with its own loss window.

A snapshot, in one database session:
  1. a temporary physical replication slot pins the WAL from now on, so no segment the
     copy needs is recycled, whatever `wal_keep_size` is (the slot dies with the session);
  2. `pg_backup_start(label, fast => true)` gives the start LSN (a fresh checkpoint);
  3. every data file is read in 1 MiB chunks; a chunk is stored once, compressed, appended to
     this snapshot's pack file(s), and found by its sha256 through the manifests' chunk index,
     so an unchanged chunk is never uploaded again; the index also holds the sha256 of the
     compressed bytes as stored (zlib ignores some bits of its input, so a damaged byte can
     still decompress to the right data: the stored bytes are checked before they are used);
  4. `pg_backup_stop(wait_for_archive => false)` gives the stop LSN and backup_label;
  5. the WAL segments from start to stop go into the generation like data files;
  6. the manifest is written under tmp/, fsynced, read back and renamed into generations/.

Between generations the watcher ships the WAL itself (`ship_wal`): every second or so under
writes, the WAL flushed since the last piece goes into one small file, so a commit is on the
destination within about a second instead of a snapshot's worth of seconds. Restore replays
the generation and then the unbroken run of its WAL pieces.

Layout of the destination (only published manifests are trusted by restore):
  generations/<id>.json   manifest: files with sizes, sha256 and chunk list, chunk index, LSNs, and
                          its own sha256
  packs/<id>-<n>.pack     zlib-compressed chunks, back to back (up to 64 MiB per pack)
  wal/<id>/<lsn>.wal      WAL pieces shipped after generation <id>: a JSON header line, then zlib
  tmp/                    partial writes; emptied under the lock before and after each snapshot

Google Drive costs a round trip per file operation and uploads asynchronously, in any order:
so few, large files (packs rather than one file per chunk), small folders, and a restore that
checks every file a generation needs (sizes, then checksums) before trusting it. The lock
that serialises writers is a local file (Drive is no place for locks).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psycopg

from . import procs
from .errors import SnapshotError

FORMAT = 3
# 1: one file per chunk under blobs/; 2: packs, without checksums of the stored bytes (both read, never written)
READABLE_FORMATS = (1, 2, 3)
CHUNK_SIZE = 1024 * 1024
PACK_SIZE = 64 * 1024 * 1024
DEFAULT_KEEP = 5
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
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# ----------------------------------------------------------------------------- public data

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


@dataclass(frozen=True)
class GenerationInfo:
    """A published generation as found on the destination; `ok` False says why in `reason`."""
    id: str
    path: Path
    ok: bool
    reason: str | None
    created: float | None = None
    size: int | None = None
    start_lsn: str | None = None
    stop_lsn: str | None = None
    pg_version: str | None = None
    system_identifier: str | None = None
    xact_snapshot: str | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RestoreReport:
    generation: str
    created: float
    pgdata: Path
    skipped: list[tuple[str, str]]   # (generation id, why it was not used), newest first
    replaced: Path | None            # where a non-empty data folder was moved aside (force=True)
    files: int
    size: int
    pg_version: str
    stop_lsn: str
    duration_s: float
    wal_pieces: int = 0              # WAL pieces replayed on top of the generation
    wal_reached: str | None = None   # the LSN the restored WAL reaches
    wal_note: str | None = None      # why later WAL pieces were not used (a gap, a damaged piece)


@dataclass
class SnapshotStatus:
    """What the watcher last wrote to its status file."""
    state: str = "starting"          # starting | watching | snapshotting | failing | waiting-db | stopped
    pid: int | None = None
    updated_at: float = 0.0
    last_id: str | None = None
    last_at: float | None = None     # when the last snapshot was published (unix time)
    last_size: int | None = None
    last_uploaded: int | None = None
    last_duration_s: float | None = None
    last_error: str | None = None    # the error of the last attempt, None once a snapshot succeeds again
    last_error_at: float | None = None
    last_wal_at: float | None = None  # when WAL was last shipped (unix time)
    wal_pieces: int = 0              # WAL pieces shipped by this watcher
    wakeups: int = 0                 # inotify wake-ups
    checks: int = 0                  # database change checks
    snapshots: int = 0
    failures: int = 0

    @property
    def age_s(self) -> float | None:
        return None if self.last_at is None else max(0.0, time.time() - self.last_at)


class SnapshotCache:
    """Per-file chunk lists from earlier snapshots, so unchanged files are not read again."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], int, str, list[str]]] = {}

    def get(self, rel: str, key: tuple[int, ...]) -> tuple[int, str, list[str]] | None:
        entry = self._entries.get(rel)
        return entry[1:] if entry is not None and entry[0] == key else None

    def put(self, rel: str, key: tuple[int, ...], size: int, digest: str, chunks: list[str]) -> None:
        self._entries[rel] = (key, size, digest, chunks)


class _Corrupt(Exception):
    """A generation that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- destination

def check_destination(dest: Path | str, *, create: bool = False, writable: bool = True) -> Path:
    """Check that `dest` can hold snapshots; return it as an absolute path.

    Raises SnapshotError when it is not a directory, is missing (unless `create` and its
    parent exists), is not writable, or sits under a Google Drive mount point that is not
    mounted (e.g. /content/drive exists but /content/drive/MyDrive does not).
    """
    dest = Path(dest).expanduser().absolute()
    local_hint = "mount Google Drive, or point MF_SNAPSHOT_DIR at a local folder to keep snapshots local"
    for index, part in enumerate(dest.parts):
        if part in ("MyDrive", "My Drive", "Shareddrives", "Shared drives"):
            drive_root = Path(*dest.parts[:index])
            if not (drive_root / part).is_dir():
                raise SnapshotError(f"snapshot folder {dest}: Google Drive does not look mounted "
                                    f"({drive_root / part} is missing)", hint=local_hint)
            break
    if dest.exists() and not dest.is_dir():
        raise SnapshotError(f"snapshot folder {dest} is not a directory", hint=local_hint)
    if not dest.exists():
        if not (create and dest.parent.is_dir()):
            raise SnapshotError(f"snapshot folder {dest} does not exist", hint=local_hint)
        try:
            dest.mkdir(exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"cannot create snapshot folder {dest}: {exc.strerror}", hint=local_hint) from exc
    if writable:
        probe = dest / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ok")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            full = exc.errno in _FULL_ERRNOS
            raise SnapshotError(f"snapshot folder {dest} is {'full' if full else 'not writable'}: {exc.strerror}",
                                hint="free space on the drive" if full else local_hint) from exc
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
    elif not os.access(dest, os.R_OK | os.X_OK):
        raise SnapshotError(f"snapshot folder {dest} is not readable", hint=local_hint)
    return dest


def _dest_error(dest: Path, exc: OSError) -> SnapshotError:
    if exc.errno in _FULL_ERRNOS:
        return SnapshotError(f"snapshot folder {dest} is full ({exc.strerror}); the previous snapshot is intact",
                             hint="free space on Google Drive or lower the number of kept snapshots; "
                                  "the watcher retries by itself")
    return SnapshotError(f"writing the snapshot to {dest} failed: {exc}",
                         hint="check that the folder (Google Drive) is still mounted; the previous snapshot is intact")


def lock_path(dest: Path) -> Path:
    """The local lock file of a snapshot folder: same folder, same lock, for every process here."""
    digest = hashlib.sha256(str(Path(dest).absolute()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mfstack-{os.getuid()}-locks" / f"snapshots-{digest}.lock"


@contextmanager
def _dest_lock(dest: Path, timeout: float, *, shared: bool = False) -> Iterator[None]:
    """Lock on the destination, released by the kernel if the holder dies: exclusive for writers,
    shared for restores (so nothing is pruned under them; skipped on a read-only folder)."""
    path = lock_path(dest)
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if shared:
            yield
            return
        raise _dest_error(dest, exc) from exc
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SnapshotError(f"another snapshot of {dest} is in progress (lock {path} held)",
                                        hint="wait for it to finish; the lock is released when its process ends")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Some FUSE file systems refuse fsync on directories; the rename is still ordered after the data.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class _BlobStore:
    """Chunks of one snapshot appended to its pack files; chunks already stored are reused."""

    def __init__(self, dest: Path, pack_prefix: str = "") -> None:
        self.dest = dest
        self.packs = dest / "packs"
        self.tmp = dest / "tmp"
        self.generations = dest / "generations"
        self.index: dict[str, list[Any]] = {}     # digest -> [pack, offset, length, sha256 of the stored bytes]
        self.used: dict[str, list[Any]] = {}      # the part of the index this snapshot references
        self.prefix = pack_prefix or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.handle: Any = None
        self.pack_name = ""
        self.pack_count = 0
        self.uploaded = 0
        self.new_chunks = 0

    def prepare(self) -> None:
        for folder in (self.packs, self.tmp, self.generations):
            folder.mkdir(exist_ok=True)
        self.clear_tmp()
        for info in list_generations(self.dest):
            if info.ok and info.manifest is not None:
                # Chunks stored without a checksum of their stored bytes are stored again, checked.
                self.index.update((digest, location) for digest, location in _chunk_index(info.manifest).items()
                                  if len(location) == 4 and location[0] is not None)

    def clear_tmp(self) -> None:
        if self.tmp.is_dir():
            for entry in os.listdir(self.tmp):
                _remove(self.tmp / entry)

    def has(self, digest: str) -> bool:
        if digest in self.index:
            self.used[digest] = self.index[digest]
            return True
        return False

    def put(self, raw: bytes) -> str:
        digest = hashlib.sha256(raw).hexdigest()
        if self.has(digest):
            return digest
        data = zlib.compress(raw, 1)
        if self.handle is None or self.handle.tell() + len(data) > PACK_SIZE:
            self.close_pack()
            self.pack_count += 1
            self.pack_name = f"{self.prefix}-{self.pack_count}.pack"
            self.handle = open(self.packs / self.pack_name, "xb")
        offset = self.handle.tell()
        self.handle.write(data)
        self.index[digest] = self.used[digest] = [self.pack_name, offset, len(data), hashlib.sha256(data).hexdigest()]
        self.uploaded += len(data)
        self.new_chunks += 1
        return digest

    def close_pack(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            try:
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                handle.close()


def _chunk_index(manifest: dict[str, Any]) -> dict[str, list[Any]]:
    if manifest.get("format") == 1:
        return {digest: [None, 0, 0] for entry in manifest["files"] for digest in entry["chunks"]}
    return manifest["chunk_index"]


class _ChunkReader:
    """Reads chunks for a restore, keeping each pack open once."""

    def __init__(self, dest: Path, index: dict[str, list[Any]]) -> None:
        self.dest = dest
        self.index = index
        self.handles: dict[str, Any] = {}

    def read(self, digest: str) -> bytes:
        pack, offset, length, *stored = self.index.get(digest, [None, 0, 0])
        if pack is None:
            return _read_blob(self.dest, digest)
        try:
            handle = self.handles.get(pack)
            if handle is None:
                handle = self.handles[pack] = open(self.dest / "packs" / pack, "rb")
            handle.seek(offset)
            data = handle.read(length)
        except FileNotFoundError:
            raise _Corrupt(f"pack {pack} is missing") from None
        except OSError as exc:
            raise _Corrupt(f"pack {pack} cannot be read: {exc.strerror}") from None
        what = f"chunk {digest[:12]} at byte {offset} of pack {pack}"
        if len(data) != length:
            raise _Corrupt(f"{what} is truncated or damaged (only {len(data)} of {length} bytes)")
        if stored and hashlib.sha256(data).hexdigest() != stored[0]:
            raise _Corrupt(f"{what} is damaged (its stored bytes do not match their checksum)")
        return _check_chunk(data, digest, what)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def _check_chunk(data: bytes, digest: str, what: str) -> bytes:
    try:
        raw = zlib.decompress(data)
    except zlib.error:
        raise _Corrupt(f"{what} is truncated or damaged") from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise _Corrupt(f"{what} does not match its checksum")
    return raw


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _read_blob(dest: Path, digest: str) -> bytes:
    path = dest / "blobs" / digest[:2] / digest
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Corrupt(f"chunk {digest[:12]} is missing") from None
    except OSError as exc:
        raise _Corrupt(f"chunk {digest[:12]} cannot be read: {exc.strerror}") from None
    return _check_chunk(data, digest, f"chunk {digest[:12]}")


# ----------------------------------------------------------------------------- taking a snapshot

def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="mf-snapshot")
    except psycopg.Error as exc:
        raise SnapshotError(f"cannot connect to PostgreSQL for a snapshot: {str(exc).strip()}",
                            hint="is the database running? `python -m installer status`") from exc


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def wal_segments(timeline: int, start_lsn: str, stop_lsn: str, segment_size: int) -> list[str]:
    """Names of the WAL segment files holding every byte from start_lsn up to stop_lsn."""
    per_id = 0x1_0000_0000 // segment_size
    first = _lsn(start_lsn) // segment_size
    last = max(first, (_lsn(stop_lsn) - 1) // segment_size)
    return [f"{timeline:08X}{seg // per_id:08X}{seg % per_id:08X}" for seg in range(first, last + 1)]


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


def _store_file(store: _BlobStore, path: Path, rel: str, cache: SnapshotCache | None) -> dict[str, Any] | None:
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


def _manifest_checksum(body: dict[str, Any]) -> str:
    content = {key: value for key, value in body.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    with _dest_lock(dest, lock_timeout):
        store = _BlobStore(dest)
        published = False
        try:
            store.prepare()
            with _connect(dsn) as conn:
                manifest = _copy(conn, pgdata, store, cache)
            store.close_pack()
            manifest["chunk_index"] = dict(sorted(store.used.items()))
            manifest["manifest_sha256"] = _manifest_checksum(manifest)
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            part = store.tmp / f"{manifest['id']}.json.part"
            _write_durably(part, data)
            if part.read_bytes() != data:
                raise OSError(errno.EIO, f"manifest {part} did not read back as written")
            os.replace(part, store.generations / f"{manifest['id']}.json")
            _fsync_dir(store.generations)
            published = True
        except OSError as exc:
            raise _dest_error(dest, exc) from exc
        except psycopg.Error as exc:
            raise SnapshotError(f"PostgreSQL failed during the snapshot: {str(exc).strip()}",
                                hint="see the database log; the previous snapshot is intact") from exc
        finally:
            try:
                store.close_pack()
                store.clear_tmp()
                if not published:
                    _collect_garbage(dest)  # frees what a failed attempt left, e.g. on a full drive
            except OSError:
                pass
        try:
            pruned = _prune(dest, keep)
        except OSError:
            pruned = []  # retried after the next snapshot; the new generation is published regardless
    return Generation(id=manifest["id"], created=manifest["created"], size=manifest["size"],
                      uploaded=store.uploaded + len(data), new_chunks=store.new_chunks,
                      files=len(manifest["files"]), wal_segments=len(manifest["wal_segments"]),
                      start_lsn=manifest["start_lsn"], stop_lsn=manifest["stop_lsn"],
                      duration_s=time.monotonic() - started, xact_snapshot=manifest["xact_snapshot"],
                      pruned=tuple(pruned))


def _copy(conn: psycopg.Connection[Any], pgdata: Path, store: _BlobStore,
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


# ----------------------------------------------------------------------------- listing and pruning

def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise _Corrupt(f"manifest cannot be read: {exc.strerror}") from None
    except ValueError:
        raise _Corrupt("manifest is truncated or damaged (not valid JSON)") from None
    if not isinstance(manifest, dict):
        raise _Corrupt("manifest is damaged (not a JSON object)")
    if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
        raise _Corrupt("manifest is damaged (it does not match its checksum)")
    if manifest.get("format") not in READABLE_FORMATS:
        raise _Corrupt(f"manifest has format {manifest.get('format')!r}, which this version cannot read "
                       f"(it reads {', '.join(map(str, READABLE_FORMATS))}): upgrade the installer")
    return manifest


def _info(path: Path, manifest: dict[str, Any] | None, reason: str | None) -> GenerationInfo:
    m = manifest or {}
    return GenerationInfo(id=path.stem, path=path, ok=reason is None, reason=reason, created=m.get("created"),
                          size=m.get("size"), start_lsn=m.get("start_lsn"), stop_lsn=m.get("stop_lsn"),
                          pg_version=m.get("pg_version"), system_identifier=m.get("system_identifier"),
                          xact_snapshot=m.get("xact_snapshot"), manifest=manifest)


def list_generations(dest: Path | str, *, deep: bool = False) -> list[GenerationInfo]:
    """Published generations, newest first. Each is checked: its manifest against its checksum and
    every chunk it needs for presence; with `deep`, every chunk is also read and verified."""
    folder = Path(dest) / "generations"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json"), reverse=True):
        manifest = None
        try:
            manifest = _load_manifest(path)
            _check_complete(Path(dest), manifest, deep)
        except _Corrupt as exc:
            found.append(_info(path, manifest, str(exc)))
            continue
        found.append(_info(path, manifest, None))
    return found


def _check_complete(dest: Path, manifest: dict[str, Any], deep: bool) -> None:
    """Raise _Corrupt unless every file the manifest needs is there in full (Drive may deliver a
    manifest before its packs, or a pack's name before its content); `deep` reads every chunk."""
    index = _chunk_index(manifest)
    if deep:
        reader = _ChunkReader(dest, index)
        try:
            for entry in manifest["files"]:
                for digest in entry["chunks"]:
                    reader.read(digest)
        finally:
            reader.close()
        return
    extents: dict[str, int] = {}
    for entry in manifest["files"]:
        for digest in entry["chunks"]:
            location = index.get(digest)
            if location is None:
                raise _Corrupt(f"chunk {digest[:12]} of {entry['path']} is not in the chunk index")
            pack, offset, length = location[:3]
            if pack is None:
                if not (dest / "blobs" / digest[:2] / digest).is_file():
                    raise _Corrupt(f"chunk {digest[:12]} of {entry['path']} is missing")
            else:
                extents[pack] = max(extents.get(pack, 0), offset + length)
    for pack, needed in sorted(extents.items()):
        try:
            size = (dest / "packs" / pack).stat().st_size
        except FileNotFoundError:
            raise _Corrupt(f"pack {pack} is missing (not uploaded yet?)") from None
        if size < needed:
            raise _Corrupt(f"pack {pack} is incomplete ({size} of {needed} bytes arrived)")


def database_state(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """(pg_current_snapshot(), system identifier): the first changes only when a writing transaction ends."""
    row = conn.execute("SELECT pg_current_snapshot()::text,"
                       " (SELECT system_identifier FROM pg_control_system())::text").fetchone()
    assert row is not None
    return row[0], row[1]


def newest_baseline(dest: Path | str, system_id: str) -> str | None:
    """The database state the newest good generation of this cluster and its last WAL piece cover."""
    try:
        newest = next((info for info in list_generations(dest) if info.ok), None)
    except OSError:
        return None
    if newest is None or newest.system_identifier != system_id:
        return None
    folder = Path(dest) / "wal" / newest.id
    try:
        pieces = sorted(name for name in os.listdir(folder) if name.endswith(".wal"))
    except OSError:
        pieces = []
    if pieces:
        try:
            return _read_piece(folder / pieces[-1])[0]["xact_snapshot"]
        except _Corrupt:
            pass
    return newest.xact_snapshot


def unchanged_since_last(dsn: str, dest: Path | str) -> bool:
    """True when the newest good generation already holds everything the database has committed."""
    with _connect(dsn) as conn:
        current, system_id = database_state(conn)
    return newest_baseline(dest, system_id) == current


def _prune(dest: Path, keep: int) -> list[str]:
    """Drop generations older than the newest `keep` good ones, then chunks nothing references."""
    good = 0
    pruned = []
    for info in list_generations(dest):
        if good >= keep:
            info.path.unlink(missing_ok=True)
            pruned.append(info.id)
        elif info.ok:
            good += 1
    if pruned:
        _fsync_dir(dest / "generations")
    _collect_garbage(dest)
    return pruned


def _collect_garbage(dest: Path) -> None:
    """Delete chunks no published manifest references. Caller holds the lock."""
    referenced: set[str] = set()
    packs: set[str] = set()
    generations: set[str] = set()
    for path in (dest / "generations").glob("*.json"):
        generations.add(path.stem)
        try:
            manifest = json.loads(path.read_bytes())
        except OSError:
            return  # a manifest we cannot read may still need its chunks: delete nothing
        except ValueError:
            continue  # truncated: unusable anyway
        if not isinstance(manifest, dict):
            continue
        for entry in manifest.get("files", []):
            referenced.update(entry.get("chunks", []))
        packs.update(location[0] for location in manifest.get("chunk_index", {}).values())
    if (dest / "packs").is_dir():
        for name in os.listdir(dest / "packs"):
            if name not in packs:
                (dest / "packs" / name).unlink(missing_ok=True)
    if (dest / "wal").is_dir():
        for name in os.listdir(dest / "wal"):
            if name not in generations:
                _remove(dest / "wal" / name)
    blobs = dest / "blobs"
    if not blobs.is_dir():
        return
    for prefix in os.listdir(blobs):
        for name in os.listdir(blobs / prefix):
            if name not in referenced:
                (blobs / prefix / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- restore

def _is_empty_dir(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))


def restore(dest: Path | str, pgdata: Path | str, force: bool = False) -> RestoreReport:
    """Restore the newest generation that verifies into `pgdata`, falling back to older ones.

    `pgdata` must be missing or empty unless `force`, in which case the old folder is moved aside
    to `<pgdata>.replaced-<time>`. The result starts with a backup_label and the WAL it needs in
    pg_wal: PostgreSQL recovers it to the snapshot's stop point on its first start.
    """
    started = time.monotonic()
    dest = check_destination(dest, writable=False)
    pgdata = Path(pgdata).absolute()
    occupied = not _is_empty_dir(pgdata)
    running = _running_postmaster(pgdata)
    if running:
        raise SnapshotError(f"refusing to restore into {pgdata}: PostgreSQL (pid {running}) is running on it",
                            hint="stop the stack first: python -m installer down")
    if occupied and not force:
        raise SnapshotError(f"refusing to restore into {pgdata}: it is not empty",
                            hint="use force (restore --force) to move it aside to "
                                 f"{pgdata.name}.replaced-<time> and restore anyway")
    with _dest_lock(dest, 600.0, shared=True):
        return _restore_newest(dest, pgdata, occupied, started)


def _running_postmaster(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if procs.alive(pid) else None


def _restore_newest(dest: Path, pgdata: Path, occupied: bool, started: float) -> RestoreReport:
    generations = list_generations(dest)
    if not generations:
        raise SnapshotError(f"no snapshot found in {dest}", hint="nothing to restore: start with a fresh database")
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(pgdata)
    work = pgdata.parent / f".{pgdata.name}.restoring-{os.getpid()}"
    skipped: list[tuple[str, str]] = []
    for info in generations:
        if not info.ok or info.manifest is None:
            skipped.append((info.id, info.reason or "unreadable"))
            continue
        _remove(work)
        try:
            _materialize(dest, info.manifest, work)
            pieces, reached, wal_note = _apply_wal_pieces(dest, info.manifest, work)
            _seal(work)
        except _Corrupt as exc:
            _remove(work)
            skipped.append((info.id, str(exc)))
            continue
        except OSError as exc:
            _remove(work)
            raise SnapshotError(f"restoring into {pgdata} failed: {exc}",
                                hint="check free space on the local disk") from exc
        replaced = None
        if occupied:
            replaced = pgdata.with_name(f"{pgdata.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(pgdata, replaced)
        elif pgdata.exists():
            pgdata.rmdir()
        os.rename(work, pgdata)
        _fsync_dir(pgdata.parent)
        sequences_marker(pgdata).write_text(f"restored from {info.id}\n")
        manifest = info.manifest
        return RestoreReport(generation=info.id, created=manifest["created"], pgdata=pgdata, skipped=skipped,
                             replaced=replaced, files=len(manifest["files"]), size=manifest["size"],
                             pg_version=manifest["pg_version"], stop_lsn=manifest["stop_lsn"],
                             duration_s=time.monotonic() - started, wal_pieces=pieces, wal_reached=reached,
                             wal_note=wal_note)
    raise SnapshotError(f"no snapshot in {dest} could be restored: " +
                        "; ".join(f"{gid}: {why}" for gid, why in skipped),
                        hint="the snapshots are damaged; start with a fresh database or restore by hand")


def _remove_stale_work_dirs(pgdata: Path) -> None:
    for path in pgdata.parent.glob(f".{pgdata.name}.restoring-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
            _remove(path)


def _materialize(dest: Path, manifest: dict[str, Any], work: Path) -> None:
    work.mkdir(mode=0o700)
    for rel in manifest["dirs"]:
        (work / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
    reader = _ChunkReader(dest, _chunk_index(manifest))
    try:
        for entry in manifest["files"]:
            _write_file(reader, entry, work / entry["path"])
    finally:
        reader.close()
    extras = {"backup_label": manifest["backup_label"], "tablespace_map": manifest["tablespace_map"]}
    for name, text in extras.items():
        if text:
            fd = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())


def _write_file(reader: _ChunkReader, entry: dict[str, Any], target: Path) -> None:
    whole = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        for digest in entry["chunks"]:
            raw = reader.read(digest)
            whole.update(raw)
            size += len(raw)
            handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    if size != entry["size"] or whole.hexdigest() != entry["sha256"]:
        raise _Corrupt(f"{entry['path']} does not match its checksum")


def _seal(work: Path) -> None:
    # PostgreSQL refuses a data folder readable by others, whatever the umask was.
    for root, dirnames, filenames in os.walk(work):
        os.chmod(root, 0o700)
        for name in filenames:
            os.chmod(os.path.join(root, name), 0o600)
        _fsync_dir(Path(root))


# ----------------------------------------------------------------------------- WAL pieces

@dataclass
class WalChain:
    """The WAL shipped so far after one generation (kept by the watcher between pieces)."""
    generation: str
    timeline: int
    segment_size: int
    shipped_lsn: str           # everything before this LSN is on the destination
    pieces: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


def chain_after(generation: Generation, segment_size: int, timeline: int) -> WalChain:
    """A chain that starts where the generation's WAL ends. pg_backup_stop ends with a WAL switch,
    flushed before it returns, and the generation holds that segment whole: the next piece
    starts at the next segment boundary."""
    stop = _lsn(generation.stop_lsn)
    start = stop if stop % segment_size == 0 else (stop // segment_size + 1) * segment_size
    return WalChain(generation.id, timeline, segment_size, _lsn_text(start))


def _lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def ship_wal(conn: psycopg.Connection[Any], pgdata: Path | str, dest: Path | str, chain: WalChain,
             xact_snapshot: str) -> int:
    """Write the WAL flushed since `chain.shipped_lsn` as one piece under wal/<generation>/;
    return the bytes of WAL shipped (0: nothing new). `xact_snapshot` must have been read
    before this call: every transaction it shows as finished is then in the shipped WAL."""
    row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    start, end = _lsn(chain.shipped_lsn), _lsn(row[0])
    if end <= start:
        return 0
    body = bytearray()
    seg = chain.segment_size
    for name in wal_segments(chain.timeline, chain.shipped_lsn, row[0], seg):
        number = int(name[8:16], 16) * (0x1_0000_0000 // seg) + int(name[16:], 16)
        lo, hi = max(start, number * seg), min(end, (number + 1) * seg)
        with open(Path(pgdata) / "pg_wal" / name, "rb") as handle:
            handle.seek(lo - number * seg)
            data = handle.read(hi - lo)
        if len(data) != hi - lo:
            raise SnapshotError(f"WAL segment {name} is shorter than its flushed part",
                                hint="the next snapshot starts a new generation")
        body += data
    header = {"generation": chain.generation, "start_lsn": chain.shipped_lsn, "end_lsn": row[0],
              "timeline": chain.timeline, "segment_size": seg, "sha256": hashlib.sha256(body).hexdigest(),
              "xact_snapshot": xact_snapshot}
    folder = Path(dest) / "wal" / chain.generation
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Written once under its final name: a piece cut short fails its checksum and ends the chain.
        fd = os.open(folder / f"{start:016X}.wal", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(header, sort_keys=True).encode() + b"\n" + zlib.compress(bytes(body), 1))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise _dest_error(Path(dest), exc) from exc
    chain.shipped_lsn, chain.pieces, chain.bytes = row[0], chain.pieces + 1, chain.bytes + len(body)
    return len(body)


def _read_piece(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = path.read_bytes()
        line, _, packed = data.partition(b"\n")
        header = json.loads(line)
        body = zlib.decompress(packed)
    except OSError as exc:
        raise _Corrupt(f"WAL piece {path.name} cannot be read: {exc.strerror}") from None
    except (ValueError, zlib.error):
        raise _Corrupt(f"WAL piece {path.name} is truncated (not uploaded in full?)") from None
    if not isinstance(header, dict) or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise _Corrupt(f"WAL piece {path.name} does not match its checksum")
    return header, body


def _apply_wal_pieces(dest: Path, manifest: dict[str, Any], work: Path) -> tuple[int, str, str | None]:
    """Write the unbroken run of the generation's WAL pieces into work/pg_wal.
    Returns (pieces used, LSN reached, why the rest was not used or None)."""
    folder = dest / "wal" / manifest["id"]
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    seg = manifest.get("wal_segment_size") or 16 * 1024 * 1024
    timeline = manifest["timeline"]
    stop = _lsn(manifest["stop_lsn"])
    expected = stop if stop % seg == 0 else (stop // seg + 1) * seg
    used, stopped = 0, None
    for name in names:
        try:
            start = int(name.removesuffix(".wal"), 16)
        except ValueError:
            continue
        if start != expected:
            stopped = f"WAL after {_lsn_text(expected)} is missing ({len(names) - used} later piece(s) not used)"
            break
        try:
            header, body = _read_piece(folder / name)
        except _Corrupt as exc:
            stopped = f"{exc} ({len(names) - used - 1} later piece(s) not used)"
            break
        position = start
        while position < start + len(body):
            number = position // seg
            offset = position - number * seg
            take = min(seg - offset, start + len(body) - position)
            path = work / "pg_wal" / wal_segments(timeline, _lsn_text(number * seg), _lsn_text(number * seg + 1),
                                                  seg)[0]
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < seg:
                    os.ftruncate(fd, seg)  # a segment is always whole; zeros end the WAL cleanly
                os.pwrite(fd, body[position - start:position - start + take], offset)
            finally:
                os.close(fd)
            position += take
        expected = _lsn(header["end_lsn"])
        used += 1
    return used, _lsn_text(expected), stopped


# ----------------------------------------------------------------------------- sequences after a restore

SEQUENCE_GAP = 10_000


def sequences_marker(pgdata: Path | str) -> Path:
    """Left next to a restored data folder: its sequences must move on at the first start."""
    pgdata = Path(pgdata)
    return pgdata.parent / f".{pgdata.name}.advance-sequences"


def advance_sequences(dsn: str, gap: int = SEQUENCE_GAP) -> int:
    """Move every sequence of every database past what the lost window may have handed out:
    to the next multiple of `gap` at least `gap` above its value. Returns how many moved.

    Ids the dead runtime gave to runs that did not reach the snapshot folder may still be
    held by notebooks (`Run('Flow/190')`) and by files in the object store; they must
    never name another run."""
    moved = 0
    with _connect(dsn) as conn:
        databases = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")]
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    for name in databases:
        with _connect(psycopg.conninfo.make_conninfo(**{**params, "dbname": name})) as conn:
            for schema, seq, last, increment in conn.execute(
                    "SELECT schemaname, sequencename, coalesce(last_value, start_value), increment_by"
                    " FROM pg_sequences WHERE increment_by > 0").fetchall():
                target = (last + gap) // gap * gap + gap
                conn.execute("SELECT setval(format('%%I.%%I', %s::text, %s::text)::regclass, %s, false)",
                             (schema, seq, target))
                moved += 1
    return moved


# ----------------------------------------------------------------------------- status file

def write_status(path: Path | str, status: SnapshotStatus) -> None:
    """Replace the status file atomically (readers never see half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    status.updated_at = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(status), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(path: Path | str) -> SnapshotStatus | None:
    """The watcher's last status, or None if it has not written one yet."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read snapshot status {path}: {exc}",
                            hint="the watcher rewrites it on its next step") from exc
    known = {item.name for item in fields(SnapshotStatus)}
    return SnapshotStatus(**{key: value for key, value in data.items() if key in known})
