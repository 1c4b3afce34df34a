"""Snapshot PostgreSQL's data folder to the snapshot folder whenever the database changes.

    python -m installer.watcher --pgdata DIR --dest DIR --dsn-file PATH --status-file PATH
                                [--keep N] [--debounce S] [--max-delay S] [--heartbeat S]

inotify wakes the watcher on writes anywhere in the data folder. Writes alone do not mean
the data changed (PostgreSQL rewrites files at checkpoints, the snapshot itself forces
one, and the background writer logs a WAL record every 15 s after any activity, so even
the WAL insert position moves on an idle server). A wake-up is therefore confirmed by
comparing `pg_current_snapshot()` with the one recorded by the last snapshot just before
its stop: it only changes when a transaction that wrote something finished.

Between generations the watcher ships WAL pieces (snapshot.ship_wal): a confirmed change
costs one small file on the destination, so it is there within about a second. A new
generation is taken when the chain of pieces grows long (pieces, bytes or age), when another
process published a newer generation, or when the WAL cannot be followed (a reconnect loses
the replication slot that pins it). Work waits for `debounce` seconds without writes, but
never more than `max-delay` seconds after the first write.

The status file lives under MF_ROOT, on Google Drive on Colab, where every rewrite is an
upload: it is rewritten when what it says changes (state, last snapshot or WAL piece, error),
and otherwise only every `heartbeat` seconds to bring its counters (checks, wake-ups) up to date.

Safe to kill at any instant and restart: the state worth keeping is on the destination
(the newest manifest holds the transaction snapshot it covers), a killed snapshot leaves
only temporary files that the next one removes, and the destination lock dies with us.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import psycopg
from inotify_simple import INotify, flags

from .errors import SnapshotError
from .snapshot import (DEFAULT_KEEP, SnapshotCache, SnapshotStatus, WalChain, chain_after, database_state,
                       generation_id_at, newest_baseline, read_status, ship_wal, take_snapshot, write_status)

log = logging.getLogger("installer.watcher")

_MASK = (flags.MODIFY | flags.CLOSE_WRITE | flags.CREATE | flags.DELETE | flags.MOVED_TO | flags.MOVED_FROM)
_POLL_S = 60.0           # check the database even without wake-ups (inotify can overflow)
_RETRY_S = (5.0, 120.0)  # back-off after a failed snapshot: first and longest wait
_HEARTBEAT_S = 60.0      # the most seconds the status file's counters may lag behind
_HEARTBEAT_FIELDS = ("updated_at", "checks", "wakeups")
# A new generation once the chain holds this much: bounds restore work (one file per piece).
_CHAIN_PIECES, _CHAIN_BYTES, _CHAIN_AGE_S = 100, 64 * 1024 * 1024, 600.0


class _Stop(BaseException):
    """SIGTERM/SIGINT: leave whatever we are doing; cleanup runs in finally blocks."""


class Watcher:
    def __init__(self, pgdata: Path, dest: Path, dsn_file: Path, status_file: Path, *,
                 keep: int = DEFAULT_KEEP, debounce: float = 0.2, max_delay: float = 1.0,
                 heartbeat: float = _HEARTBEAT_S) -> None:
        self.pgdata = pgdata
        self.dest = dest
        self.dsn_file = dsn_file
        self.status_file = status_file
        self.keep = keep
        self.debounce = debounce
        self.max_delay = max_delay
        self.cache = SnapshotCache()
        self.baseline: str | None = None
        self.conn: psycopg.Connection | None = None
        self.chain: WalChain | None = None
        self.slot: str | None = None  # temporary replication slot on self.conn: pins the chain's WAL
        self.watched: dict[int, Path] = {}
        self.status = _initial_status(_safe_read_status(status_file))
        self.heartbeat = heartbeat
        self._written: dict | None = None  # what the status file says, heartbeat fields aside
        self._written_at = 0.0
        self._unsaved = False  # heartbeat fields changed since the last write
        self._snapshot_floor = ""  # no generation id from before our snapshot began sorts at or above this

    # -- inotify

    def _watch_tree(self, inotify: INotify, top: Path) -> None:
        for root, _dirs, _files in os.walk(top):
            try:
                self.watched[inotify.add_watch(root, _MASK)] = Path(root)
            except OSError:
                pass  # vanished meanwhile (a dropped database)

    def _drain(self, inotify: INotify, timeout_s: float) -> bool:
        events = inotify.read(timeout=max(0, int(timeout_s * 1000)))
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                continue
            if event.mask & flags.ISDIR and event.mask & (flags.CREATE | flags.MOVED_TO):
                parent = self.watched.get(event.wd)
                if parent is not None:
                    self._watch_tree(inotify, parent / event.name)
            if event.mask & flags.IGNORED:
                self.watched.pop(event.wd, None)
        return bool(events)

    # -- database

    def _dsn(self) -> str:
        try:
            return self.dsn_file.read_text().strip()
        except OSError as exc:
            raise SnapshotError(f"cannot read the database DSN from {self.dsn_file}: {exc.strerror}") from exc

    def _current_xact_snapshot(self) -> tuple[str, str]:
        for attempt in (1, 2):
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self._dsn(), autocommit=True, connect_timeout=10,
                                                application_name="mf-snapshot-watcher")
                    self.chain = self.slot = None  # the old slot died with the old session
                return database_state(self.conn)
            except psycopg.Error as exc:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise SnapshotError(f"cannot reach PostgreSQL: {str(exc).strip()}") from exc
        raise AssertionError("unreachable")

    # -- one step

    def check_and_snapshot(self) -> bool:
        """Snapshot if the database changed since the last snapshot; True if one was published."""
        current, system_id = self._current_xact_snapshot()
        self.status.checks += 1
        if self.baseline is None:
            self.baseline = newest_baseline(self.dest, system_id)
        if current == self.baseline:
            self._set_state("watching")
            return False
        if self.chain is not None and self._chain_usable():
            try:
                shipped = ship_wal(self.conn, self.pgdata, self.dest, self.chain, current)
                self.conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                                  (self.slot, self.chain.shipped_lsn))
            except psycopg.Error as exc:
                self.chain = None
                raise SnapshotError(f"shipping WAL failed: {str(exc).strip()}") from exc
            self.baseline = current
            st = self.status
            st.last_wal_at, st.wal_pieces = time.time(), st.wal_pieces + 1
            st.last_error = st.last_error_at = None
            log.info("shipped %d bytes of WAL after %s, up to %s", shipped, self.chain.generation,
                     self.chain.shipped_lsn)
            self._set_state("watching")
            return True
        self._snapshot_floor = generation_id_at(time.time())  # before the state that stopped() reads it for
        self._set_state("snapshotting")
        self._reserve_wal()
        generation = take_snapshot(self._dsn(), self.pgdata, self.dest, self.keep, cache=self.cache)
        assert self.conn is not None
        row = self.conn.execute("SELECT (SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'),"
                                " (SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
        assert row is not None
        self.chain = chain_after(generation, row[0], row[1])
        self.baseline = generation.xact_snapshot
        st = self.status
        # One statement: a stop (stopped()) sees the new id together with its count, or neither.
        st.last_id, st.snapshots = generation.id, st.snapshots + 1
        st.last_at, st.last_size = time.time(), generation.size
        st.last_uploaded, st.last_duration_s = generation.uploaded, round(generation.duration_s, 3)
        st.last_error = st.last_error_at = None
        log.info("published %s: %d bytes, %d uploaded, %.2f s", generation.id, generation.size,
                 generation.uploaded, generation.duration_s)
        self._set_state("watching")
        return True

    def _reserve_wal(self) -> None:
        """A temporary slot, made before the generation: the WAL after it is kept until shipped."""
        if self.slot is None and self.conn is not None:
            name = f"mf_ship_{os.getpid()}"
            try:
                self.conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (name,))
            except psycopg.Error as exc:
                raise SnapshotError(f"cannot create the WAL shipping slot: {str(exc).strip()}",
                                    hint="start PostgreSQL with -c max_replication_slots=10") from exc
            self.slot = name

    def _chain_usable(self) -> bool:
        chain = self.chain
        assert chain is not None
        if self.slot is None or chain.pieces >= _CHAIN_PIECES or chain.bytes >= _CHAIN_BYTES or \
                time.monotonic() - chain.started >= _CHAIN_AGE_S:
            return False
        # a generation published by someone else (`snapshot`, `down`) supersedes our chain
        return self._newest_manifest() == f"{chain.generation}.json"

    def _newest_manifest(self) -> str:
        """The newest published manifest's file name; "" when none or unreadable."""
        try:
            return max((name for name in os.listdir(self.dest / "generations") if name.endswith(".json")),
                       default="")
        except OSError:
            return ""

    def stopped(self) -> None:
        """Write the final status. A stop that landed after our snapshot was published (while it pruned
        old generations, say) still counts it: a manifest created after our snapshot began is ours, as
        the destination's lock, held for the whole snapshot, kept anyone else from making one."""
        st = self.status
        if st.state == "snapshotting":
            newest = self._newest_manifest()[:-len(".json")]
            if newest and newest >= self._snapshot_floor and newest != st.last_id:
                st.last_id, st.snapshots = newest, st.snapshots + 1
                st.last_at, st.last_size, st.last_uploaded, st.last_duration_s = time.time(), None, None, None
                st.last_error = st.last_error_at = None
                log.info("published %s before the stop", newest)
        st.state = "stopped"
        write_status(self.status_file, st)

    def _set_state(self, state: str) -> None:
        self.status.state = state
        self._save_status()

    def _save_status(self) -> None:
        content = {key: value for key, value in asdict(self.status).items() if key not in _HEARTBEAT_FIELDS}
        now = time.monotonic()
        if content == self._written and now < self._written_at + self.heartbeat:
            self._unsaved = True
            return
        write_status(self.status_file, self.status)
        self._written, self._written_at, self._unsaved = content, now, False

    def _heartbeat_due(self) -> float:
        return self._written_at + self.heartbeat if self._unsaved else float("inf")

    # -- main loop

    def run(self) -> None:
        with INotify() as inotify:
            self._watch_tree(inotify, self.pgdata)
            pending, first_write, last_write = True, 0.0, 0.0  # check once at start: restarts lose nothing
            retry_at, backoff = 0.0, _RETRY_S[0]
            last_check = time.monotonic()
            while True:  # the first check comes at once and writes the first status
                due = self._due(pending, first_write, last_write, retry_at, last_check)
                if self._drain(inotify, min(due, self._heartbeat_due()) - time.monotonic()):
                    self.status.wakeups += 1
                    now = time.monotonic()
                    if not pending:
                        pending, first_write = True, now
                    last_write = now
                    due = self._due(pending, first_write, last_write, retry_at, last_check)
                if time.monotonic() >= self._heartbeat_due():
                    self._save_status()
                if time.monotonic() < due:
                    continue
                last_check = time.monotonic()
                try:
                    self.check_and_snapshot()
                    pending, retry_at, backoff = False, 0.0, _RETRY_S[0]
                except SnapshotError as exc:
                    log.warning("snapshot failed: %s", exc)
                    self.status.failures += 1
                    self.status.last_error, self.status.last_error_at = exc.message, time.time()
                    self._set_state("failing")
                    retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, _RETRY_S[1])

    def _due(self, pending: bool, first_write: float, last_write: float, retry_at: float,
             last_check: float) -> float:
        if not pending:
            return last_check + _POLL_S
        return max(min(last_write + self.debounce, first_write + self.max_delay), retry_at)


def _safe_read_status(path: Path) -> SnapshotStatus | None:
    try:
        return read_status(path)
    except SnapshotError:
        return None


def _initial_status(previous: SnapshotStatus | None) -> SnapshotStatus:
    """A fresh status that still shows the last snapshot and error from before a restart."""
    status = SnapshotStatus(pid=os.getpid())
    if previous is not None:
        for name in ("last_id", "last_at", "last_size", "last_uploaded", "last_duration_s", "last_error",
                     "last_error_at"):
            setattr(status, name, getattr(previous, name))
    return status


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m installer.watcher", description=__doc__.split("\n")[0])
    parser.add_argument("--pgdata", type=Path, required=True, help="PostgreSQL data folder (host path)")
    parser.add_argument("--dest", type=Path, required=True, help="snapshot folder (Google Drive)")
    parser.add_argument("--dsn-file", type=Path, required=True, help="file holding the libpq connection string")
    parser.add_argument("--status-file", type=Path, required=True, help="JSON status written here")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="generations to keep (default 5)")
    parser.add_argument("--debounce", type=float, default=0.2, help="seconds without writes before a snapshot")
    parser.add_argument("--max-delay", type=float, default=1.0,
                        help="most seconds between the first write and its snapshot under steady writes")
    parser.add_argument("--heartbeat", type=float, default=_HEARTBEAT_S,
                        help="rewrite the status file at least this often (seconds) while nothing else changes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    watcher = Watcher(args.pgdata, args.dest, args.dsn_file, args.status_file, keep=args.keep,
                      debounce=args.debounce, max_delay=args.max_delay, heartbeat=args.heartbeat)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        watcher.run()
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        watcher.stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
