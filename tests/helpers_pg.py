"""A real PostgreSQL 15 (Debian's binaries) on a free loopback port, a steady writer, and one
kill-everything-then-restore round, shared by the snapshot tests and scripts/soak_snapshots.py.

Run as a script it is the writer:  python tests/helpers_pg.py writer DSN LOGFILE RATE
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from installer import procs  # noqa: E402
from installer.snapshot import (REQUIRED_SETTINGS, SnapshotStatus, advance_sequences, clear_marker,  # noqa: E402
                                list_generations, read_marker, read_status, restore)

PG_BIN = Path(os.environ.get("MF_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"          # the OS user that owns test clusters (initdb refuses root)
PASSWORD = "snapshot-test-pw"


def require_pg15() -> None:
    """Fail loudly (never skip) when the PostgreSQL 15 server binaries are not installed."""
    missing = [name for name in ("initdb", "postgres", "pg_ctl", "pg_amcheck") if not (PG_BIN / name).is_file()]
    if missing:
        raise AssertionError(f"PostgreSQL 15 binaries missing in {PG_BIN}: {', '.join(missing)}; "
                             "install them with `apt-get install -y postgresql-15`")
    try:
        subprocess.run(["id", PG_USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        raise AssertionError(f"the OS user {PG_USER!r} is missing (it comes with the postgresql-15 package)") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_workdir(prefix: str = "mf-snap-") -> Path:
    """A scratch folder the postgres user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def chown_tree(path: Path, user: str = PG_USER) -> None:
    shutil.chown(path, user, user)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), user, user)


def as_pg_user(*cmd: str) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd]


class PgCluster:
    """One PostgreSQL 15 server on 127.0.0.1:<port> with password authentication."""

    def __init__(self, datadir: Path, port: int | None = None) -> None:
        self.datadir = datadir
        self.port = port or free_port()
        self.log = datadir.parent / f"{datadir.name}.log"

    @classmethod
    def initdb(cls, datadir: Path) -> PgCluster:
        require_pg15()
        datadir.mkdir(mode=0o700)
        pwfile = datadir.parent / f"{datadir.name}.pw"
        pwfile.write_text(PASSWORD + "\n")
        chown_tree(datadir)
        shutil.chown(pwfile, PG_USER, PG_USER)
        procs.run(as_pg_user(str(PG_BIN / "initdb"), "-D", str(datadir), "-U", "postgres",
                             "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync"),
                  what="initdb", timeout=120)
        pwfile.unlink()
        return cls(datadir)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres password={PASSWORD} dbname=postgres"

    def start(self, timeout: float = 60.0) -> None:
        settings = {**REQUIRED_SETTINGS, "port": str(self.port), "listen_addresses": "127.0.0.1",
                    "unix_socket_directories": "", "logging_collector": "off"}
        args = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        self.runner = procs.spawn(as_pg_user(str(PG_BIN / "postgres"), "-D", str(self.datadir), *args),
                                  log_path=self.log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if not procs.alive(self.runner):
                    raise AssertionError(f"PostgreSQL exited at start-up:\n{procs.tail(self.log, 40)}") from exc
                if time.monotonic() > deadline:
                    raise AssertionError(f"PostgreSQL not ready after {timeout:.0f} s:\n{procs.tail(self.log)}") from exc
                time.sleep(0.1)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """The postmaster, its children and the runuser parent."""
        pids = [self.runner] if procs.alive(getattr(self, "runner", None)) else []
        master = self.postmaster_pid()
        if master and procs.alive(master):
            pids += [master] + [info.pid for info in procs.descendants(master)]
        return pids

    def stop(self) -> None:
        """Fast shutdown; SIGKILL if it does not go. Safe to call twice."""
        master = self.postmaster_pid()
        if master and procs.alive(master):
            procs.send(master, signal.SIGINT)
            if procs.wait_gone([master], 30):
                procs.kill_tree(self.pids())
        procs.kill_tree(self.pids())

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def amcheck(self) -> str:
        """pg_amcheck over every database (B-tree indexes incl. heap-all-indexed, and heaps);
        raises with its report if anything is corrupt."""
        done = procs.run([str(PG_BIN / "pg_amcheck"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                          "--all", "--install-missing", "--heapallindexed", "--rootdescend", "--progress"],
                         env={"PGPASSWORD": PASSWORD}, check=False, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"pg_amcheck found problems (exit {done.returncode}):\n{done.stdout[-4000:]}")
        return done.stdout


# ----------------------------------------------------------------------------- writer

COUNTER_TABLE = ("CREATE TABLE IF NOT EXISTS counters (n bigint PRIMARY KEY, committed_at timestamptz NOT NULL,"
                 " pad text NOT NULL, run_id bigserial UNIQUE)")


@contextmanager
def running_cluster(datadir: Path, *statements: str) -> Iterator[PgCluster]:
    """A new cluster in `datadir`, started, with `statements` run; stopped afterwards."""
    cluster = PgCluster.initdb(datadir)
    cluster.start()
    with cluster.connect() as conn:
        for statement in statements:
            conn.execute(statement)
    try:
        yield cluster
    finally:
        cluster.stop()


def writer_main(dsn: str, log_path: str, rate: float) -> None:
    """Insert 1, 2, 3... one transaction each, each row taking a run id from a sequence (as the
    metadata service does); after each commit returns, log `n unix_time run_id`."""
    with psycopg.connect(dsn) as conn, open(log_path, "a", buffering=1) as log:
        conn.execute(COUNTER_TABLE)
        conn.commit()
        n = 0
        period = 1.0 / rate
        next_at = time.monotonic()
        while True:
            n += 1
            run_id = conn.execute("INSERT INTO counters VALUES (%s, clock_timestamp(), repeat('x', 200)) "
                                  "RETURNING run_id", (n,)).fetchone()[0]
            conn.commit()
            log.write(f"{n} {time.time():.6f} {run_id}\n")
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))


def read_writer_log(path: Path) -> tuple[dict[int, float], int]:
    """({n: commit time}, highest run id handed out)."""
    committed, top_id = {}, 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:  # the last line may be cut by the kill
            committed[int(parts[0])] = float(parts[1])
            top_id = max(top_id, int(parts[2]))
    return committed, top_id


def start_writer(dsn: str, log_path: Path, rate: float, out: Path) -> int:
    return procs.spawn([sys.executable, str(Path(__file__).resolve()), "writer", dsn, str(log_path), str(rate)],
                       log_path=out, cwd=REPO)


def start_watcher(pgdata: Path, dest: Path, dsn: str, status: Path, out: Path, *,
                  keep: int = 5, debounce: float = 0.2, max_delay: float = 1.0, heartbeat: float | None = None) -> int:
    dsn_file = status.parent / "dsn"
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    return procs.spawn([sys.executable, "-m", "installer.watcher", "--pgdata", str(pgdata), "--dest", str(dest),
                        "--dsn-file", str(dsn_file), "--status-file", str(status), "--keep", str(keep),
                        "--debounce", str(debounce), "--max-delay", str(max_delay)] +
                       (["--heartbeat", str(heartbeat)] if heartbeat is not None else []), log_path=out, cwd=REPO)


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------------- one crash round

_TEMPLATE: dict[str, Path] = {}


def template_cluster(base: Path) -> Path:
    """A freshly initialised data folder, made once per process (again if its folder was removed)
    and copied for every round."""
    if "path" not in _TEMPLATE or not _TEMPLATE["path"].is_dir():
        cluster = PgCluster.initdb(base / "template")
        _TEMPLATE["path"] = cluster.datadir
    return _TEMPLATE["path"]


def start_restored(workdir: Path, dest: Path, name: str = "restored", *,
                   now: float | None = None) -> tuple[PgCluster, object]:
    """Restore the newest good generation into a fresh folder and start PostgreSQL on it;
    sequences then move past the lost window, as the stack does at its first start
    (`now`: the time the stack would see then)."""
    target = workdir / name / "pgdata"
    target.parent.mkdir()
    target.parent.chmod(0o755)
    report = restore(dest, target)
    chown_tree(target)
    cluster = PgCluster(target)
    cluster.start()
    point = read_marker(target)
    assert point is not None and point.generation == report.generation
    advance_sequences(cluster.dsn, point.point_time, now=now)
    clear_marker(target)
    return cluster, report


@dataclass
class RoundResult:
    restored: int            # highest counter restored (0: none)
    committed: int           # highest counter the writer saw committed
    loss_window_s: float     # commit time of the last committed row minus that of the last restored row
    restore_s: float         # restore() plus PostgreSQL's recovery until it accepts connections
    generation: str
    skipped: list[tuple[str, str]]
    generations_published: int
    wal_pieces: int = 0      # WAL pieces replayed on top of the generation
    wal_note: str | None = None
    mid_snapshot: bool = False


def crash_round(base: Path, rng: random.Random, *, rate: float = 30.0, max_wait: float = 8.0,
                keep: int = 5, drive: dict | None = None) -> RoundResult:
    """Writer + watcher on a live server; SIGKILL all of it at a random instant; restore the
    destination into a fresh folder; check it starts, passes amcheck, holds a gap-free prefix and
    hands out no run id twice. With `drive` (DriveMount settings) the destination is on the
    Drive-like mount, which dies too: a new mount shows only what was uploaded."""
    from tests.drivefs import DriveMount

    work = Path(tempfile.mkdtemp(prefix="round-", dir=base))
    work.chmod(0o755)
    source = PgCluster(work / "pgdata")
    shutil.copytree(template_cluster(base), source.datadir, symlinks=True)
    chown_tree(source.datadir)
    dest, status, log = work / "drive", work / "status.json", work / "writer.log"
    mount = None
    if drive is not None:
        mount = DriveMount(work / "mnt", work / "google", seed=rng.randrange(1 << 30), **drive).start()
        dest = mount.mountpoint / "snapshots"
    dest.mkdir()
    victims: list[int] = []
    restored_cluster: PgCluster | None = None
    try:
        source.start()
        writer = start_writer(source.dsn, log, rate, work / "writer.out")
        victims.append(writer)
        wait_for(lambda: log.exists() and log.stat().st_size > 0, 30, "the writer's first commit")
        watcher = start_watcher(source.datadir, dest, source.dsn, status, work / "watcher.out", keep=keep)
        victims.append(watcher)
        uploaded = dest if mount is None else mount.backing / "snapshots"  # what would survive a death now
        wait_for(lambda: any(g.ok for g in list_generations(uploaded)), 60, "the first published snapshot")
        time.sleep(rng.uniform(0.0, max_wait))
        everything = victims + [info.pid for pid in victims for info in procs.descendants(pid)] + source.pids()
        mid_snapshot = (read_status(status) or SnapshotStatus()).state == "snapshotting"
        if mount is not None and mount.proc is not None:
            everything.append(mount.proc.pid)
        for pid in everything:  # back to back: as close to one instant as signals get
            procs.send(pid, signal.SIGKILL)
        if procs.wait_gone(everything, 10):
            raise AssertionError("processes survived SIGKILL")
        if mount is not None:
            mount.kill()
            mount = mount.fresh()  # the new runtime's Drive
        published = len(list_generations(dest))
        committed, top_id = read_writer_log(log)

        started = time.monotonic()
        restored_cluster, report = start_restored(work, dest)
        restore_s = time.monotonic() - started
        restored_cluster.amcheck()
        with restored_cluster.connect() as conn:
            rows = [r[0] for r in conn.execute("SELECT n FROM counters ORDER BY n")] \
                if conn.execute("SELECT to_regclass('counters')").fetchone()[0] else []
        top = rows[-1] if rows else 0
        if rows != list(range(1, top + 1)):
            raise AssertionError(f"restored counters are not gap-free: first gap after "
                                 f"{next(i for i, n in enumerate(rows, 1) if n != i) - 1}")
        last_committed = max(committed, default=0)
        if top > last_committed + 1:  # +1: a commit may land just before the writer could log it
            raise AssertionError(f"restored counter {top} was never committed (writer saw up to {last_committed})")
        with restored_cluster.connect() as conn:
            next_id = conn.execute("SELECT nextval(pg_get_serial_sequence('counters', 'run_id'))").fetchone()[0] \
                if rows else top_id + 1
        if next_id <= top_id:
            raise AssertionError(f"run id {next_id} handed out again (the dead runtime reached {top_id})")
        start_time = min(committed.values(), default=0.0)
        loss = (committed[last_committed] - committed.get(top, start_time)) if last_committed else 0.0
        return RoundResult(restored=top, committed=last_committed, loss_window_s=max(0.0, loss),
                           restore_s=restore_s, generation=report.generation, skipped=report.skipped,
                           generations_published=published, wal_pieces=report.wal_pieces,
                           wal_note=report.wal_note, mid_snapshot=mid_snapshot)
    finally:
        procs.kill_tree([pid for pid in victims if procs.alive(pid)])
        source.stop()
        if restored_cluster is not None:
            restored_cluster.stop()
        if mount is not None:
            mount.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "writer":
        writer_main(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit("usage: helpers_pg.py writer DSN LOGFILE RATE")
