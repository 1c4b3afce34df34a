"""Service logs: written on local disk, bounded, copied to MF_ROOT/logs in small segments.

Every service appends (O_APPEND, see procs.spawn) to CACHE_DIR/logs/<service>.log. On Colab
MF_ROOT is Google Drive, where every append to a file uploads the whole file again: a log that
grows there costs more with each line. So the live logs stay local, and `tend` (called by the
monitor every few seconds, and once more by `down` and by a failed `up`) does two things:

- copies the bytes written since the last copy into MF_ROOT/logs/<service>/NNNNNN.log, segments
  of at most SEGMENT_BYTES, so one copy rewrites at most one small file; the oldest segments are
  removed so that the folder stays under the cap (MF_LOG_MAX_MB);
- rotates a live log that reached a quarter of the cap. The services hold their log open (O_APPEND)
  and cannot be asked to reopen it, so the copied part is cut from the file's start in place:
  fallocate(COLLAPSE_RANGE), atomic against their writes, so a line written meanwhile is kept.
  Where the file system cannot do that, the file is truncated (copy-truncate): a line written in
  the instant between the last read and the truncate is then lost. The recent part (an eighth of
  the cap) is kept beside it as <service>.log.1, so the local pair stays under the cap too.

The copy position (inode and offset) is kept on local disk beside the log: a copy after a restart
of the monitor goes on where the last one stopped.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

SEGMENT_BYTES = 256 * 1024
_SEGMENT = re.compile(r"^(\d{6})\.log$")


@dataclass(frozen=True)
class Limits:
    cap: int  # bytes, for the live pair and for the folder of copies alike

    @property
    def rotate_at(self) -> int:
        return max(self.cap // 4, 1)

    @property
    def kept(self) -> int:
        """The recent part of a rotated log kept locally beside it: room left for a burst between rounds."""
        return max(self.cap // 8, 1)

    @property
    def segment(self) -> int:
        return max(min(SEGMENT_BYTES, self.cap // 8), 1)


def limits(max_mb: int) -> Limits:
    return Limits(cap=max_mb * 1024 * 1024)


def copies_dir(logs_dir: Path, service: str) -> Path:
    """Where the copies of one service's log live (MF_ROOT/logs/<service>)."""
    return logs_dir / service


def segments(folder: Path) -> list[Path]:
    """The copies in a folder, oldest first."""
    try:
        names = sorted(name for name in os.listdir(folder) if _SEGMENT.match(name))
    except OSError:
        return []
    return [folder / name for name in names]


def tend(live_dir: Path, logs_dir: Path, max_mb: int, only_large: bool = False) -> dict[str, int]:
    """Copy and rotate every live log under `live_dir`; returns the bytes copied per service.

    With `only_large`, only the logs due for rotation (the copies of the others can wait).
    """
    bounds = limits(max_mb)
    copied = {}
    try:
        names = sorted(name[:-len(".log")] for name in os.listdir(live_dir) if name.endswith(".log"))
    except OSError:
        return {}
    for service in names:
        if only_large and size(live_dir / f"{service}.log") < bounds.rotate_at:
            continue
        copied[service] = tend_one(live_dir / f"{service}.log", copies_dir(logs_dir, service), bounds)
    return copied


def tend_one(live: Path, dest: Path, bounds: Limits) -> int:
    """Copy what `live` gained since the last copy into `dest`; rotate it once it is large."""
    cursor = live.with_name(f".{live.name}.copied")
    try:
        handle = open(live, "rb+")
    except OSError:
        return 0
    with handle:
        info = os.fstat(handle.fileno())
        inode, offset = _read_cursor(cursor)
        if inode != info.st_ino or offset > info.st_size:
            offset = 0  # a new file, or truncated by someone else: all of it is new
        handle.seek(offset)
        fresh = handle.read()
        end = offset + len(fresh)
        if fresh:
            _append(dest, fresh, bounds)
        if end >= bounds.rotate_at:
            # The recent part stays readable locally; what is older is in the copies.
            start = max(0, end - bounds.kept)
            handle.seek(start)
            _write_atomic(live.with_name(live.name + ".1"), handle.read(end - start))
            end -= _drop_copied(handle.fileno(), end)
            _write_atomic(_seam(live), f"{end}\n".encode())
        _write_atomic(cursor, f"{info.st_ino} {end}\n".encode())
    return len(fresh)


_FALLOC_FL_COLLAPSE_RANGE = 0x08
_fallocate = None


def _drop_copied(fd: int, copied: int) -> int:
    """Remove (up to) the first `copied` bytes of the open file; returns how many were removed."""
    block = os.fstatvfs(fd).f_bsize
    length = copied // block * block
    if length >= os.fstat(fd).st_size:
        length -= block  # the collapsed range may not reach the end of the file
    if length > 0 and _collapse(fd, length):
        return length
    os.ftruncate(fd, 0)
    return copied


def _collapse(fd: int, length: int) -> bool:
    global _fallocate
    if _fallocate is None:
        import ctypes  # here: the monitor, which imports this module, stays small until a log is rotated

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _fallocate = (libc.fallocate, ctypes.get_errno)
    call, last_errno = _fallocate
    if call(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, length) == 0:
        return True
    code = last_errno()
    if code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code))


def _read_cursor(path: Path) -> tuple[int, int]:
    try:
        inode, offset = path.read_text().split()
        return int(inode), int(offset)
    except (OSError, ValueError):
        return -1, 0


def _append(dest: Path, data: bytes, bounds: Limits) -> None:
    """Add `data` to the newest segment and new ones after it; drop the oldest to stay under the cap."""
    dest.mkdir(parents=True, exist_ok=True)
    if len(data) > bounds.cap:
        data = data[-bounds.cap:]  # more than the folder may hold: keep the newest
    existing = segments(dest)
    number = int(existing[-1].name[:6]) if existing else 0  # numbers go on rising after a prune
    sizes = {path: size(path) for path in existing}
    while existing and sum(sizes.values()) + len(data) > bounds.cap:
        oldest = existing.pop(0)
        oldest.unlink(missing_ok=True)
        sizes.pop(oldest)
    current = existing[-1] if existing else None
    room = bounds.segment - sizes[current] if current is not None else 0
    while data:
        if current is None or room <= 0:
            number += 1
            current, room = dest / f"{number:06d}.log", bounds.segment
        piece, data = data[:room], data[room:]
        with open(current, "ab") as out:
            out.write(piece)
        room -= len(piece)


def size(path: Path) -> int:
    """Bytes in a file, 0 if it is not there (a log not yet written, or a copy just pruned)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def _seam(live: Path) -> Path:
    return live.with_name(f".{live.name}.seam")


def resume_after_rotation(live: Path) -> tuple[bytes, int] | None:
    """For a reader of `live` that saw it shrink: the recent part kept in <log>.1, and the offset in
    `live` where the output goes on after the last byte of it; None if unknown."""
    try:
        kept = live.with_name(live.name + ".1").read_bytes()
        offset = int(_seam(live).read_text())
        size = live.stat().st_size
    except (OSError, ValueError):
        return None
    return (kept, offset) if offset <= size else None


def readable(live: Path, logs_dir: Path, service: str) -> Path:
    """The file that shows a service's latest lines: its live log, or on a new machine its newest copy."""
    if live.exists():
        return live
    copies = segments(copies_dir(logs_dir, service))
    return copies[-1] if copies else live
