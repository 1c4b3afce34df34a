"""A FUSE file system that behaves like Google Drive on Colab, for tests and benchmarks.

    python -m tests.drivefs MOUNTPOINT --backing DIR --work DIR --control SOCKET
                            [--latency S] [--upload-delay S] [--reorder S] [--refuse symlink,link,chmod]

What a runtime sees (the mount) is a local write cache, as with Colab's Drive; what "Google"
holds is the backing folder, which an uploader thread brings up to date behind the cache:

- Per-operation latency: every round trip Drive makes (create, open, mkdir, unlink, rmdir,
  rename, fsync, readdir, truncate) sleeps `--latency` seconds; listing a folder costs one
  more latency per 1000 entries. Reads and writes of an open file are local (the cache).
- Refusals, as on Drive: symlinks fail with EOPNOTSUPP, hard links with EOPNOTSUPP, chmod
  and chown succeed without effect; files always show as -rw------- and folders as drwx------
  owned by root, so nothing on the mount can be executed (EACCES). Each refusal can be
  turned off (`--refuse` names the ones in force) to test one at a time.
- Asynchronous, reordered uploads: a file's content is queued for upload when it is closed
  or fsynced after a write; a name operation (create, mkdir, rename, unlink, rmdir) is queued
  when it happens. Each upload becomes due `--upload-delay` plus a random `0..--reorder`
  seconds later. Uploads of one file's names keep their order, and so do its contents,
  but the two streams are independent, and different files are uploaded in any order: a
  manifest may reach Google before the chunks it names, a renamed file may arrive under its
  new name with its old (or no) content.
- Runtime death: SIGKILL this process. Everything not uploaded is gone with it; the backing
  folder keeps exactly the uploads that were done, each done whole or not at all.
- A new runtime: a new mount over the same backing folder (the cache starts as a copy of it).
- `flush` on the control socket waits until every upload is done, like
  `google.colab.drive.flush_and_unmount()`; `stats` gives operation counts.

What it cannot reproduce: Google's real latencies and bandwidth (downloads of files not
in the cache cost only the fixed latency here), upload failures and retries, Drive's
handling of two runtimes writing the same folder, quota errors (see the tmpfs tests),
and the exact errno of a refused hard link on real Drive (not documented; EOPNOTSUPP here).
"""

from __future__ import annotations

import argparse
import errno
import heapq
import itertools
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFUSALS = ("symlink", "link", "chmod")
LATENT_OPS = {"create", "open", "mkdir", "unlink", "rmdir", "rename", "fsync", "readdir", "truncate"}


@dataclass(order=True)
class _Upload:
    due: float
    seq: int
    stream: tuple[int, str] = field(compare=False)    # (inode, "name" | "data")
    kind: str = field(compare=False)                  # create | mkdir | rename | unlink | rmdir | data
    ino: int = field(compare=False)
    path: str = field(compare=False, default="")      # the name the operation gave (create, mkdir, rename)
    spool: str | None = field(compare=False, default=None)


class Uploader:
    """The 'Google' side: applies queued uploads to the backing folder when due."""

    def __init__(self, backing: Path, spool: Path, delay: float, reorder: float, seed: int) -> None:
        self.backing = backing
        self.spool = spool
        self.delay = delay
        self.reorder = reorder
        self.rng = random.Random(seed)
        self.heap: list[_Upload] = []
        self.streams: dict[tuple[int, str], deque[int]] = defaultdict(deque)  # pending seqs, oldest first
        self.where: dict[int, str] = {}          # inode -> its path in the backing folder
        self.lock = threading.Condition()
        self.seq = itertools.count()
        self.done = 0
        self.bytes_up = 0

    def enqueue(self, kind: str, ino: int, path: str = "", spool: str | None = None) -> None:
        stream = (ino, "data" if kind == "data" else "name")
        with self.lock:
            item = _Upload(time.monotonic() + self.delay + self.rng.uniform(0, self.reorder), next(self.seq),
                           stream, kind, ino, path, spool)
            heapq.heappush(self.heap, item)
            self.streams[stream].append(item.seq)
            self.lock.notify_all()

    def pending(self) -> int:
        with self.lock:
            return len(self.heap)

    def run(self) -> None:
        while True:
            with self.lock:
                item = self._next_ready()
                if item is None:
                    self.lock.wait(0.01)
                    continue
            self._apply(item)
            with self.lock:
                self.streams[item.stream].popleft()
                self.done += 1
                self.lock.notify_all()

    def _next_ready(self) -> _Upload | None:
        """The earliest due upload that is the oldest of its stream (a data upload also waits
        for its file to exist up there)."""
        now = time.monotonic()
        skipped = []
        chosen = None
        while self.heap and self.heap[0].due <= now:
            item = heapq.heappop(self.heap)
            blocked = self.streams[item.stream][0] != item.seq or (
                item.kind == "data" and item.ino not in self.where and bool(self.streams[(item.ino, "name")]))
            if blocked:
                skipped.append(item)
                continue
            chosen = item
            break
        for item in skipped:
            heapq.heappush(self.heap, item)
        return chosen

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            for item in self.heap:
                item.due = 0.0  # flush: upload now, still one file at a time and in stream order
            heapq.heapify(self.heap)
            while self.heap or any(self.streams.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, 0.05))
        return True

    # -- applying one upload to the backing folder

    def _target(self, rel: str) -> Path:
        return self.backing / rel

    def _evict(self, rel: str, keep: int) -> None:
        for ino, path in list(self.where.items()):
            if ino != keep and (path == rel or path.startswith(rel + "/")):
                del self.where[ino]

    def _apply(self, item: _Upload) -> None:
        try:
            getattr(self, f"_apply_{item.kind}")(item)
        except OSError as exc:  # what Drive would do with an upload it cannot place: drop it
            print(f"drivefs: upload {item.kind} {item.path or item.ino} dropped: {exc}", file=sys.stderr, flush=True)
        finally:
            if item.spool:
                Path(item.spool).unlink(missing_ok=True)

    def _apply_create(self, item: _Upload) -> None:
        target = self._target(item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        self._evict(item.path, item.ino)
        target.write_bytes(b"")
        self.where[item.ino] = item.path

    def _apply_mkdir(self, item: _Upload) -> None:
        self._target(item.path).mkdir(parents=True, exist_ok=True)
        self.where[item.ino] = item.path

    def _apply_rename(self, item: _Upload) -> None:
        old = self.where.get(item.ino)
        if old is None:
            return
        source, target = self._target(old), self._target(item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not source.is_dir():
            shutil.rmtree(target)
        self._evict(item.path, item.ino)
        os.replace(source, target)
        for ino, path in list(self.where.items()):
            if path == old or path.startswith(old + "/"):
                self.where[ino] = item.path + path[len(old):]

    def _apply_unlink(self, item: _Upload) -> None:
        rel = self.where.pop(item.ino, None)
        if rel is not None:
            self._target(rel).unlink(missing_ok=True)

    def _apply_rmdir(self, item: _Upload) -> None:
        rel = self.where.pop(item.ino, None)
        if rel is not None:
            shutil.rmtree(self._target(rel), ignore_errors=True)  # Drive trashes a folder with what it holds
            self._evict(rel, -1)

    def _apply_data(self, item: _Upload) -> None:
        rel = self.where.get(item.ino)
        if rel is None or item.spool is None:
            return  # deleted before its content went up
        target = self._target(rel)
        staging = self.backing.parent / f".{self.backing.name}.uploading"
        staging.mkdir(exist_ok=True)
        part = staging / f"up-{item.seq}"
        shutil.copyfile(item.spool, part)
        os.replace(part, target)  # an upload lands whole or not at all
        self.bytes_up += target.stat().st_size


class DriveOps:
    """The mount: a passthrough to the cache folder with Drive's latency, refusals and uploads."""

    use_ns = True

    def __init__(self, cache: Path, uploader: Uploader, latency: float, refuse: set[str]) -> None:
        self.cache = cache
        self.uploader = uploader
        self.latency = latency
        self.refuse = refuse
        self.counts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.inodes: dict[str, int] = {}
        self.next_ino = itertools.count(1)
        self.dirty: set[int] = set()
        self._mutex = threading.RLock()  # not `lock`: that name is a FUSE operation
        for root, dirs, files in os.walk(cache):
            for name in dirs + files:
                self.inodes[os.path.relpath(os.path.join(root, name), cache)] = next(self.next_ino)

    # -- helpers

    def _op(self, name: str, entries: int = 0) -> None:
        with self._mutex:
            self.counts[name] += 1
        if name in LATENT_OPS and self.latency:
            time.sleep(self.latency * (1 + entries // 1000))

    def _full(self, path: str) -> str:
        return os.path.join(self.cache, path.lstrip("/"))

    @staticmethod
    def _rel(path: str) -> str:
        return path.lstrip("/")

    def _ino(self, rel: str) -> int:
        with self._mutex:
            if rel not in self.inodes:
                self.inodes[rel] = next(self.next_ino)
            return self.inodes[rel]

    def _refuse(self, what: str) -> None:
        with self._mutex:
            self.refused[what] += 1
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def _capture(self, rel: str, fd: int) -> None:
        """Queue the file's current content for upload (Drive uploads whole files)."""
        ino = self._ino(rel)
        with self._mutex:
            if ino not in self.dirty:
                return
            self.dirty.discard(ino)
        fdno, spool = tempfile.mkstemp(dir=self.uploader.spool, prefix="data-")
        with os.fdopen(fdno, "wb") as out:
            offset = 0
            while True:
                block = os.pread(fd, 1 << 20, offset)
                if not block:
                    break
                out.write(block)
                offset += len(block)
        self.uploader.enqueue("data", ino, spool=spool)

    # -- metadata

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._op("getattr")
        st = os.lstat(self._full(path))
        is_dir = stat.S_ISDIR(st.st_mode)
        if "chmod" in self.refuse:
            mode = (stat.S_IFDIR | 0o700) if is_dir else (stat.S_IFREG | 0o600)
        else:
            mode = st.st_mode
        return {"st_mode": mode, "st_size": st.st_size, "st_nlink": 2 if is_dir else 1, "st_uid": 0,
                "st_gid": 0, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
                "st_ino": self._ino(self._rel(path)) if path != "/" else 1}

    def access(self, path: str, amode: int) -> int:
        self._op("access")
        full = self._full(path)
        if not os.path.lexists(full):
            raise OSError(errno.ENOENT, "no such file")
        if amode & os.X_OK and not os.path.isdir(full) and "chmod" in self.refuse:
            raise OSError(errno.EACCES, "Drive does not execute files")
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        names = os.listdir(self._full(path))
        self._op("readdir", len(names))
        return [".", ".."] + names

    def statfs(self, path: str) -> dict[str, int]:
        self._op("statfs")
        sv = os.statvfs(self.cache)
        return {key: getattr(sv, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                  "f_files", "f_ffree", "f_favail", "f_namemax")}

    def chmod(self, path: str, mode: int) -> int:
        self._op("chmod")
        if "chmod" in self.refuse:
            with self._mutex:
                self.refused["chmod"] += 1
            return 0  # accepted, without effect: modes are always 0600 / 0700
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._op("chown")
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._op("utimens")
        if times is None:
            os.utime(self._full(path))
        else:
            os.utime(self._full(path), ns=times)
        return 0

    def symlink(self, target: str, source: str) -> int:
        self._op("symlink")
        if "symlink" in self.refuse:
            self._refuse("symlink")
        os.symlink(source, self._full(target))
        self.uploader.enqueue("create", self._ino(self._rel(target)), self._rel(target))
        return 0

    def readlink(self, path: str) -> str:
        self._op("readlink")
        return os.readlink(self._full(path))

    def link(self, target: str, source: str) -> int:
        self._op("link")
        if "link" in self.refuse:
            self._refuse("link")
        os.link(self._full(source), self._full(target))
        rel = self._rel(target)
        ino = self._ino(rel)
        self.uploader.enqueue("create", ino, rel)
        with self._mutex:
            self.dirty.add(ino)
        fd = os.open(self._full(target), os.O_RDONLY)
        try:
            self._capture(rel, fd)
        finally:
            os.close(fd)
        return 0

    # -- names

    def mkdir(self, path: str, mode: int) -> int:
        self._op("mkdir")
        os.mkdir(self._full(path), 0o700)
        rel = self._rel(path)
        self.uploader.enqueue("mkdir", self._ino(rel), rel)
        return 0

    def rmdir(self, path: str) -> int:
        self._op("rmdir")
        os.rmdir(self._full(path))
        rel = self._rel(path)
        with self._mutex:
            ino = self.inodes.pop(rel, None)
        if ino is not None:
            self.uploader.enqueue("rmdir", ino)
        return 0

    def unlink(self, path: str) -> int:
        self._op("unlink")
        os.unlink(self._full(path))
        rel = self._rel(path)
        with self._mutex:
            ino = self.inodes.pop(rel, None)
        if ino is not None:
            self.uploader.enqueue("unlink", ino)
        return 0

    def rename(self, old: str, new: str) -> int:
        self._op("rename")
        os.rename(self._full(old), self._full(new))
        rel_old, rel_new = self._rel(old), self._rel(new)
        with self._mutex:
            for key in [k for k in self.inodes if k == rel_new or k.startswith(rel_new + "/")]:
                del self.inodes[key]
            moved = {k: v for k, v in self.inodes.items() if k == rel_old or k.startswith(rel_old + "/")}
            for key, ino in moved.items():
                del self.inodes[key]
                self.inodes[rel_new + key[len(rel_old):]] = ino
            ino = self.inodes.get(rel_new)
        if ino is not None:
            self.uploader.enqueue("rename", ino, rel_new)
        return 0

    # -- files

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._op("create")
        fd = os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        rel = self._rel(path)
        ino = self._ino(rel)
        self.uploader.enqueue("create", ino, rel)
        return fd

    def open(self, path: str, flags: int) -> int:
        self._op("open")
        fd = os.open(self._full(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))
        ino = self._ino(self._rel(path))
        with self._mutex:
            if flags & os.O_TRUNC:
                self.dirty.add(ino)
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        written = os.pwrite(fh, data, offset)
        if path is None:
            return written  # an unlinked file still open
        with self._mutex:
            self.dirty.add(self._ino(self._rel(path)))
        return written

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._op("truncate")
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        ino = self._ino(self._rel(path))
        with self._mutex:
            self.dirty.add(ino)
        if fh is None:
            fd = os.open(self._full(path), os.O_RDONLY)
            try:
                self._capture(self._rel(path), fd)
            finally:
                os.close(fd)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self._op("fsync")
        if path is not None:
            self._capture(self._rel(path), fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        try:
            if path is not None and os.path.exists(self._full(path)):
                self._capture(self._rel(path), fh)
        finally:
            os.close(fh)
        return 0

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            ops = dict(self.counts)
            refused = dict(self.refused)
        return {"ops": ops, "round_trips": sum(n for k, n in ops.items() if k in LATENT_OPS),
                "refused": refused, "pending_uploads": self.uploader.pending(),
                "uploads_done": self.uploader.done, "bytes_uploaded": self.uploader.bytes_up}

    def reset(self) -> None:
        with self._mutex:
            self.counts.clear()
            self.refused.clear()


def _serve_control(path: Path, ops: DriveOps) -> None:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            words = self.rfile.readline().decode().split()
            if not words:
                return
            if words[0] == "stats":
                reply: Any = ops.stats()
            elif words[0] == "reset":
                ops.reset()
                reply = {"ok": True}
            elif words[0] == "flush":
                reply = {"ok": ops.uploader.flush(float(words[1]) if len(words) > 1 else 600.0)}
            else:
                reply = {"error": f"unknown command {words[0]!r}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    path.unlink(missing_ok=True)
    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def serve(mountpoint: Path, backing: Path, work: Path, control: Path, *, latency: float, delay: float,
          reorder: float, refuse: set[str], seed: int) -> None:
    from mfusepy import FUSE

    cache, spool = work / "cache", work / "spool"
    for folder in (cache, spool):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(backing, cache)  # a new runtime starts with what reached Google
    spool.mkdir()
    uploader = Uploader(backing, spool, delay, reorder, seed)
    ops = DriveOps(cache, uploader, latency, refuse)
    # The backing folder's files start where they are; the uploader must know their inodes.
    for rel, ino in ops.inodes.items():
        uploader.where[ino] = rel
    threading.Thread(target=uploader.run, daemon=True).start()
    _serve_control(control, ops)
    FUSE(ops, str(mountpoint), foreground=True, nothreads=False, fsname="drive", subtype="drive",
         nosuid=True, nodev=True, hard_remove=True, attr_timeout=1.0, entry_timeout=1.0)


# ----------------------------------------------------------------------------- for tests and scripts

class DriveMount:
    """One runtime's Drive: a drivefs process mounted at `mountpoint` over `backing`."""

    def __init__(self, mountpoint: Path, backing: Path, *, latency: float = 0.05, upload_delay: float = 1.0,
                 reorder: float = 1.0, refuse: tuple[str, ...] = REFUSALS, seed: int = 0) -> None:
        self.mountpoint = Path(mountpoint)
        self.backing = Path(backing)
        self.settings = {"latency": latency, "upload_delay": upload_delay, "reorder": reorder,
                         "refuse": refuse, "seed": seed}
        self.work = Path(tempfile.mkdtemp(prefix="drivefs-"))
        self.control = self.work / "control.sock"
        self.log = self.work / "drivefs.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DriveMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        s = self.settings
        argv = [sys.executable, "-m", "tests.drivefs", str(self.mountpoint), "--backing", str(self.backing),
                "--work", str(self.work), "--control", str(self.control), "--latency", str(s["latency"]),
                "--upload-delay", str(s["upload_delay"]), "--reorder", str(s["reorder"]),
                "--refuse", ",".join(s["refuse"]), "--seed", str(s["seed"])]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(self.mountpoint) and self.control.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"drivefs did not mount {self.mountpoint} (needs /dev/fuse and fuse3: "
                                     f"apt-get install fuse3 libfuse3-3):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def _ask(self, line: str, timeout: float = 600.0) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                block = sock.recv(65536)
                if not block:
                    break
                data += block
        return json.loads(data)

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset_stats(self) -> None:
        self._ask("reset")

    def flush(self, timeout: float = 600.0) -> None:
        if not self._ask(f"flush {timeout}", timeout + 5)["ok"]:
            raise AssertionError(f"drivefs uploads not done after {timeout} s")

    def kill(self) -> None:
        """The runtime dies: pending uploads are lost; the mount point is released."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._unmount()

    def stop(self) -> None:
        """Flush, then unmount cleanly (drive.flush_and_unmount())."""
        if self.proc is not None and self.proc.poll() is None:
            self.flush()
        self.kill()

    def _unmount(self) -> None:
        if os.path.ismount(self.mountpoint) or _is_dead_mount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def fresh(self, **changes: Any) -> DriveMount:
        """The Drive folder as a new runtime mounts it (only what reached Google)."""
        settings = {**self.settings, **changes}
        return DriveMount(self.mountpoint, self.backing, latency=settings["latency"],
                          upload_delay=settings["upload_delay"], reorder=settings["reorder"],
                          refuse=tuple(settings["refuse"]), seed=settings["seed"] + 1).start()


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.drivefs", description=__doc__.split("\n")[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--backing", type=Path, required=True, help="what reached Google")
    parser.add_argument("--work", type=Path, required=True, help="local cache and upload spool (local disk)")
    parser.add_argument("--control", type=Path, required=True, help="unix socket: stats | reset | flush [S]")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per round trip")
    parser.add_argument("--upload-delay", type=float, default=1.0)
    parser.add_argument("--reorder", type=float, default=1.0, help="random extra delay per upload, 0..S")
    parser.add_argument("--refuse", default=",".join(REFUSALS), help="refusals in force: symlink,link,chmod")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    refuse = {word for word in args.refuse.split(",") if word}
    unknown = refuse - set(REFUSALS)
    if unknown:
        parser.error(f"unknown refusal(s): {', '.join(sorted(unknown))}")
    serve(args.mountpoint, args.backing, args.work, args.control, latency=args.latency, delay=args.upload_delay,
          reorder=args.reorder, refuse=refuse, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def assert_refuses_like_drive(existing: Path) -> None:
    """In the folder of `existing` (a file on the mount): no symlinks and no hard links (EOPNOTSUPP),
    and chmod is accepted without effect (files stay -rw-------)."""
    folder = existing.parent
    for make, target in ((os.symlink, folder / "a-symlink"), (os.link, folder / "a-hard-link")):
        try:
            make(str(existing), str(target))
        except OSError as exc:
            assert exc.errno == errno.EOPNOTSUPP, (make.__name__, exc)
        else:
            raise AssertionError(f"{make.__name__} succeeded on the Drive-like mount")
    os.chmod(existing, 0o755)
    assert oct(os.stat(existing).st_mode & 0o777) == "0o600"
