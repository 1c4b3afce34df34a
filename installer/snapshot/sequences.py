"""Ids after a restore: no id is handed out twice, whatever the dead runtimes did.

A restored database knows nothing of what happened after its restored point: the runtime that
died may have handed out run and task ids in its last seconds (a notebook holds `Run('Flow/190')`,
the object store holds files under that id) that no upload carried to Drive. And moving the
sequences on at the restore is itself a write that can be lost: a runtime that restores, hands out
ids, and dies before any of its WAL reached Google leaves the next restore with the very same
restored point. A fixed jump from the restored value would then hand the same ids out again.

So the jump grows with the clock. At the first start after a restore every sequence moves to

    restored value + GAP + RATE x (seconds from the restored point to now)

where the restored point's time is when its newest WAL piece was shipped (or its generation was
taken), a fact of the restored data itself: two restores of the same point compute the same base.

- Ids lost after the restored point (the loss window) are covered as long as fewer than GAP plus
  RATE per second since that point were handed out in it.
- Two restores of the same point: the later one starts RATE x (seconds between them) above the
  earlier one, so whatever the earlier runtime handed out before it died unseen is below it as long
  as it handed out fewer than RATE ids per second of its life. A runtime whose ids never reached
  Drive died within seconds of its first write (WAL is shipped every second or so), so that bound
  is far above anything a notebook does.

RATE and GAP follow the sequence's type: a 32-bit sequence (Metaflow's run numbers) moves by at most
2 a second, which leaves decades of downtime before its limit; a 64-bit one (task ids, metadata and
artifact rows) by 1,000 a second. Only a clock that goes backwards between two runtimes (by more than
the time between their restores) defeats the scheme.

The value is read from the sequence itself: `pg_sequences.last_value` is NULL after a setval(..., false)
until the next nextval, which once sent every sequence back to its start.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from ..errors import SnapshotError
from .pg import connect


@dataclass(frozen=True)
class Step:
    gap: int
    per_second: int


STEPS: dict[str, Step] = {
    "smallint": Step(gap=100, per_second=0),
    "integer": Step(gap=10_000, per_second=2),
    "bigint": Step(gap=1_000_000, per_second=1_000),
}


@dataclass(frozen=True)
class RestoredPoint:
    """What the first start after a restore needs to know: which point, and how old it is."""
    generation: str
    point_time: float | None   # unix time of the restored point; None for markers of older versions


def sequences_marker(pgdata: Path | str) -> Path:
    """Left next to a restored data folder: its sequences must move on at the first start."""
    pgdata = Path(pgdata)
    return pgdata.parent / f".{pgdata.name}.advance-sequences"


def write_marker(pgdata: Path, point: RestoredPoint) -> None:
    path = sequences_marker(pgdata)
    with open(path, "w") as handle:
        handle.write(json.dumps({"generation": point.generation, "point_time": point.point_time}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_marker(pgdata: Path | str) -> RestoredPoint | None:
    """The restored point a data folder waits to move its sequences past, or None."""
    try:
        text = sequences_marker(pgdata).read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return RestoredPoint(str(data["generation"]), None if data["point_time"] is None
                             else float(data["point_time"]))
    except (ValueError, KeyError, TypeError):
        return RestoredPoint(text.strip(), None)  # written by an earlier version: "restored from <id>"


def clear_marker(pgdata: Path | str) -> None:
    sequences_marker(pgdata).unlink(missing_ok=True)


def target_value(value: int, data_type: str, elapsed_s: float) -> int:
    """Where a sequence at `value` moves, `elapsed_s` after its restored point."""
    step = STEPS.get(data_type, STEPS["bigint"])
    return value + step.gap + math.ceil(step.per_second * max(0.0, elapsed_s))


def advance_sequences(dsn: str, point_time: float | None = None, *, now: float | None = None) -> int:
    """Move every sequence of every database past what lost windows may have handed out (see the
    module's docstring). Returns how many moved."""
    elapsed = 0.0 if point_time is None else (time.time() if now is None else now) - point_time
    moved = 0
    with connect(dsn) as conn:
        databases = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")]
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    for name in databases:
        with connect(psycopg.conninfo.make_conninfo(**{**params, "dbname": name})) as conn:
            for schema, sequence, data_type, maximum in conn.execute(
                    "SELECT schemaname, sequencename, data_type::text, max_value FROM pg_sequences"
                    " WHERE increment_by > 0").fetchall():
                _advance(conn, schema, sequence, data_type, maximum, elapsed)
                moved += 1
    return moved


def _advance(conn: psycopg.Connection[Any], schema: str, sequence: str, data_type: str, maximum: int,
             elapsed: float) -> None:
    name = conn.execute("SELECT format('%%I.%%I', %s::text, %s::text)", (schema, sequence)).fetchone()
    assert name is not None
    row = conn.execute(f"SELECT last_value FROM {name[0]}").fetchone()  # the sequence itself, never NULL
    assert row is not None
    target = target_value(row[0], data_type, elapsed)
    if target > maximum:
        raise SnapshotError(f"sequence {schema}.{sequence} cannot move past what a lost window may have "
                            f"handed out: {target} is above its maximum {maximum}",
                            hint="the restored database has used up its ids; restore by hand")
    conn.execute("SELECT setval(%s::regclass, %s, false)", (name[0], target))
