"""The snapshot folder: checks before use, the local lock that serialises writers, durable writes.

The lock is a local file keyed by the folder's path: Google Drive is no place for locks, and a
lock there would be neither shared with this machine's other processes nor needed by the next runtime.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SnapshotError


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
            full = exc.errno in FULL_ERRNOS
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


def dest_error(dest: Path, exc: OSError) -> SnapshotError:
    if exc.errno in FULL_ERRNOS:
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
def dest_lock(dest: Path, timeout: float, *, shared: bool = False) -> Iterator[None]:
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
        raise dest_error(dest, exc) from exc
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


def fsync_dir(path: Path) -> None:
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


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
