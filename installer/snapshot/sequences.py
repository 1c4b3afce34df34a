"""Sequences after a restore (see advance_sequences)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from .pg import connect


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
    with connect(dsn) as conn:
        databases = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")]
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    for name in databases:
        with connect(psycopg.conninfo.make_conninfo(**{**params, "dbname": name})) as conn:
            for schema, seq, last, increment in conn.execute(
                    "SELECT schemaname, sequencename, coalesce(last_value, start_value), increment_by"
                    " FROM pg_sequences WHERE increment_by > 0").fetchall():
                target = (last + gap) // gap * gap + gap
                conn.execute("SELECT setval(format('%%I.%%I', %s::text, %s::text)::regclass, %s, false)",
                             (schema, seq, target))
                moved += 1
    return moved
