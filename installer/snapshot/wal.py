"""WAL shipped between generations: small pieces under wal/<generation>/, replayed after it."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import psycopg

from ..errors import SnapshotError
from .destination import dest_error
from .packs import Corrupt
from .pg import lsn, lsn_text, wal_segments

if TYPE_CHECKING:
    from .backup import Generation


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
    stop = lsn(generation.stop_lsn)
    start = stop if stop % segment_size == 0 else (stop // segment_size + 1) * segment_size
    return WalChain(generation.id, timeline, segment_size, lsn_text(start))


def ship_wal(conn: psycopg.Connection[Any], pgdata: Path | str, dest: Path | str, chain: WalChain,
             xact_snapshot: str) -> int:
    """Write the WAL flushed since `chain.shipped_lsn` as one piece under wal/<generation>/;
    return the bytes of WAL shipped (0: nothing new). `xact_snapshot` must have been read
    before this call: every transaction it shows as finished is then in the shipped WAL."""
    row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    start, end = lsn(chain.shipped_lsn), lsn(row[0])
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
              "xact_snapshot": xact_snapshot, "shipped_at": time.time()}
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
        raise dest_error(Path(dest), exc) from exc
    chain.shipped_lsn, chain.pieces, chain.bytes = row[0], chain.pieces + 1, chain.bytes + len(body)
    return len(body)


def read_piece(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = path.read_bytes()
        line, _, packed = data.partition(b"\n")
        header = json.loads(line)
        body = zlib.decompress(packed)
    except OSError as exc:
        raise Corrupt(f"WAL piece {path.name} cannot be read: {exc.strerror}") from None
    except (ValueError, zlib.error):
        raise Corrupt(f"WAL piece {path.name} is truncated (not uploaded in full?)") from None
    if not isinstance(header, dict) or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise Corrupt(f"WAL piece {path.name} does not match its checksum")
    return header, body


def apply_wal_pieces(dest: Path, manifest: dict[str, Any], work: Path
                     ) -> tuple[int, str, str | None, float | None]:
    """Write the unbroken run of the generation's WAL pieces into work/pg_wal.
    Returns (pieces used, LSN reached, why the rest was not used or None, when the last piece used
    was shipped or None)."""
    folder = dest / "wal" / manifest["id"]
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    seg = manifest.get("wal_segment_size") or 16 * 1024 * 1024
    timeline = manifest["timeline"]
    stop = lsn(manifest["stop_lsn"])
    expected = stop if stop % seg == 0 else (stop // seg + 1) * seg
    used, stopped, shipped_at = 0, None, None
    for name in names:
        try:
            start = int(name.removesuffix(".wal"), 16)
        except ValueError:
            continue
        if start != expected:
            stopped = f"WAL after {lsn_text(expected)} is missing ({len(names) - used} later piece(s) not used)"
            break
        try:
            header, body = read_piece(folder / name)
        except Corrupt as exc:
            stopped = f"{exc} ({len(names) - used - 1} later piece(s) not used)"
            break
        position = start
        while position < start + len(body):
            number = position // seg
            offset = position - number * seg
            take = min(seg - offset, start + len(body) - position)
            path = work / "pg_wal" / wal_segments(timeline, lsn_text(number * seg), lsn_text(number * seg + 1),
                                                  seg)[0]
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < seg:
                    os.ftruncate(fd, seg)  # a segment is always whole; zeros end the WAL cleanly
                os.pwrite(fd, body[position - start:position - start + take], offset)
            finally:
                os.close(fd)
            position += take
        expected = lsn(header["end_lsn"])
        used += 1
        shipped_at = header.get("shipped_at", shipped_at)
    return used, lsn_text(expected), stopped, shipped_at
