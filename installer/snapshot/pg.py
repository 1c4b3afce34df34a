"""The PostgreSQL side of snapshots: connections and WAL positions."""

from __future__ import annotations

from typing import Any

import psycopg

from ..errors import SnapshotError


def connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="mf-snapshot")
    except psycopg.Error as exc:
        raise SnapshotError(f"cannot connect to PostgreSQL for a snapshot: {str(exc).strip()}",
                            hint="is the database running? `python -m installer status`") from exc


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def wal_segments(timeline: int, start_lsn: str, stop_lsn: str, segment_size: int) -> list[str]:
    """Names of the WAL segment files holding every byte from start_lsn up to stop_lsn."""
    per_id = 0x1_0000_0000 // segment_size
    first = lsn(start_lsn) // segment_size
    last = max(first, (lsn(stop_lsn) - 1) // segment_size)
    return [f"{timeline:08X}{seg // per_id:08X}{seg % per_id:08X}" for seg in range(first, last + 1)]
