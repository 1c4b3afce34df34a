"""Secrets kept in small owner-only files: the proxy's access token, the database password.

A secret file holds one line: a URL-safe random string. It is created with
mode 0600 inside a 0700 folder, and written atomically (temporary file in the
same folder, fsync, rename) so that a reader never sees a half-written value
and a crash never leaves an empty file behind (where a crash still can, on Google Drive, an empty
file found later is replaced: see `_left_empty`). Readers that cache a secret can
watch the file's (mtime, inode): every write replaces the inode.
"""

from __future__ import annotations

import errno
import os
import secrets as _random
import stat
import time
from pathlib import Path

from .errors import ConfigError, StackError

__all__ = ["new_secret", "read_or_create_secret", "read_secret", "rotate_secret", "write_secret"]

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_MIN_LENGTH = 16
_MAX_LENGTH = 4096


def new_secret(nbytes: int = 32) -> str:
    """A fresh URL-safe random string carrying `nbytes` bytes of randomness."""
    if nbytes < 16:
        raise ConfigError(f"a secret needs at least 16 random bytes, not {nbytes}")
    return _random.token_urlsafe(nbytes)


def _check_value(value: str, path: Path) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"secret for {path} must be text")
    # Values travel in HTTP headers, cookies, URLs and connection strings.
    if not (_MIN_LENGTH <= len(value) <= _MAX_LENGTH) or not value.isascii() or not value.isprintable() \
            or any(ch.isspace() for ch in value):
        raise ConfigError(f"unusable secret for {path}: it must be {_MIN_LENGTH}-{_MAX_LENGTH} printable "
                          "ASCII characters without spaces",
                          hint="use a generated value (leave it unset) or a long random string")
    return value


def _ensure_dir(folder: Path) -> None:
    try:
        folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StackError(f"cannot create the secrets folder {folder}: {exc.strerror}",
                         hint="check that the folder is writable") from exc


def _tighten(fd: int) -> None:
    """0600, where the file system keeps modes (Google Drive's FUSE folder does not: no error then)."""
    try:
        os.fchmod(fd, _FILE_MODE)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some FUSE file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def _write_temp(folder: Path, name: str, value: str) -> Path:
    """Write `value` to a new 0600 file next to the target and return its path."""
    while True:
        temp = folder / f".{name}.{_random.token_hex(6)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
            break
        except FileExistsError:
            continue
    try:
        _tighten(fd)
        os.write(fd, (value + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def read_secret(path: Path) -> str:
    """The secret stored at `path`; raises ConfigError if missing, unreadable or malformed."""
    value = _read_if_present(Path(path))
    if value is None:
        raise ConfigError(f"secret file {path} does not exist")
    return value


def _read_if_present(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}",
                          hint="check its owner and permissions (it should be 0600)") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"secret file {path} is not a regular file")
        if info.st_mode & 0o077 and info.st_uid == os.getuid():
            _tighten(fd)  # a file someone loosened by hand
        raw = os.read(fd, _MAX_LENGTH + 2)
    finally:
        os.close(fd)
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {path} does not hold ASCII text",
                          hint="delete it to generate a new secret, or rewrite it") from None
    return _check_value(value, path)


def read_or_create_secret(path: Path, nbytes: int = 32) -> str:
    """The secret at `path`, generating and storing one (0600, atomically) if there is none yet.

    Two processes racing to create it end up with the same value: the file is
    published with a hard link, which fails if another process got there first.
    """
    path = Path(path)
    if _left_empty(path):
        write_secret(path, new_secret(nbytes))
        return read_secret(path)
    existing = _read_if_present(path)
    if existing is not None:
        return existing
    _ensure_dir(path.parent)
    value = new_secret(nbytes)
    temp = _write_temp(path.parent, path.name, value)
    try:
        os.link(temp, path)
    except FileExistsError:
        return read_secret(path)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise StackError(f"cannot create secret file {path}: {exc.strerror}",
                             hint="check that its folder is writable") from exc
        # Google Drive's FUSE folder has no hard links: create the file exclusively instead
        # (a reader may then see it empty for an instant; read_secret treats that as malformed).
        return _create_exclusively(path, value)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return value


# A writer fills the file it created within this long (a local write after the create returned).
_EMPTY_FOR_S = 1.0


def _left_empty(path: Path) -> bool:
    """A secret file with nothing in it, for longer than any writer takes: what a machine that died
    between creating the file and writing it leaves. On Google Drive a file's name and its content
    are uploaded separately and either can be lost with the runtime, so the next runtime can find the
    name alone. It holds no secret to keep: a new one replaces it. A file with anything in it is
    never replaced (a broken value is reported)."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0 and time.time() - info.st_mtime > _EMPTY_FOR_S


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _create_exclusively(path: Path, value: str) -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    except FileExistsError:
        return read_secret(path)
    except OSError as exc:
        raise StackError(f"cannot create secret file {path}: {exc.strerror}",
                         hint="check that its folder is writable") from exc
    try:
        os.write(fd, (value + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return value


def write_secret(path: Path, value: str) -> None:
    """Store `value` at `path` (0600), atomically replacing any previous secret."""
    path = Path(path)
    _check_value(value, path)
    _ensure_dir(path.parent)
    temp = _write_temp(path.parent, path.name, value)
    try:
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StackError(f"cannot write secret file {path}: {exc.strerror}",
                         hint="check that its folder is writable") from exc
    _fsync_dir(path.parent)


def rotate_secret(path: Path, nbytes: int = 32) -> str:
    """Replace the secret at `path` with a fresh one and return it."""
    value = new_secret(nbytes)
    write_secret(path, value)
    return value
