"""Restoring the newest generation that verifies, and the unbroken run of its WAL pieces."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import procs
from ..errors import SnapshotError
from .destination import check_destination, dest_lock, fsync_dir, remove_path
from .generations import list_generations
from .packs import ChunkReader, Corrupt, chunk_index
from .sequences import RestoredPoint, write_marker
from .wal import apply_wal_pieces


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
    point_time: float | None = None  # unix time of the restored point (last WAL piece, else the backup)


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
    with dest_lock(dest, 600.0, shared=True):
        return _restore_newest(dest, pgdata, occupied, started)


def _running_postmaster(pgdata: Path) -> int | None:
    return procs.pid_file_owner(pgdata / "postmaster.pid", "postgres")


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
        remove_path(work)
        try:
            _materialize(dest, info.manifest, work)
            pieces, reached, wal_note, shipped_at = apply_wal_pieces(dest, info.manifest, work)
            _seal(work)
        except Corrupt as exc:
            remove_path(work)
            skipped.append((info.id, str(exc)))
            continue
        except OSError as exc:
            remove_path(work)
            raise SnapshotError(f"restoring into {pgdata} failed: {exc}",
                                hint="check free space on the local disk") from exc
        manifest = info.manifest
        # The time of the restored point: its last WAL piece, else the end of the generation's backup.
        point_time = shipped_at if shipped_at is not None else manifest.get("finished", manifest["created"])
        # Before the data folder takes its place: a machine that dies in between must not start the
        # restored data without moving its sequences on (on the old data an advance is harmless).
        write_marker(pgdata, RestoredPoint(info.id, point_time))
        replaced = None
        if occupied:
            replaced = pgdata.with_name(f"{pgdata.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(pgdata, replaced)
        elif pgdata.exists():
            pgdata.rmdir()
        os.rename(work, pgdata)
        fsync_dir(pgdata.parent)
        return RestoreReport(generation=info.id, created=manifest["created"], pgdata=pgdata, skipped=skipped,
                             replaced=replaced, files=len(manifest["files"]), size=manifest["size"],
                             pg_version=manifest["pg_version"], stop_lsn=manifest["stop_lsn"],
                             duration_s=time.monotonic() - started, wal_pieces=pieces, wal_reached=reached,
                             wal_note=wal_note, point_time=point_time)
    raise SnapshotError(f"no snapshot in {dest} could be restored: " +
                        "; ".join(f"{gid}: {why}" for gid, why in skipped),
                        hint="the snapshots are damaged; start with a fresh database or restore by hand")


def _remove_stale_work_dirs(pgdata: Path) -> None:
    for path in pgdata.parent.glob(f".{pgdata.name}.restoring-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
            remove_path(path)


def _materialize(dest: Path, manifest: dict[str, Any], work: Path) -> None:
    work.mkdir(mode=0o700)
    for rel in manifest["dirs"]:
        (work / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
    reader = ChunkReader(dest, chunk_index(manifest))
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


def _write_file(reader: ChunkReader, entry: dict[str, Any], target: Path) -> None:
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
        raise Corrupt(f"{entry['path']} does not match its checksum")


def _seal(work: Path) -> None:
    # PostgreSQL refuses a data folder readable by others, whatever the umask was.
    for root, dirnames, filenames in os.walk(work):
        os.chmod(root, 0o700)
        for name in filenames:
            os.chmod(os.path.join(root, name), 0o600)
        fsync_dir(Path(root))
