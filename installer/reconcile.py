"""After a restore, the database and the object store agree on which tasks finished.

The database reaches Drive as WAL pieces, the runs' files as objects of the object store, each
uploaded on its own and in any order: a runtime that dies can leave a restored database saying a
task finished (`attempt_ok` True, its artifacts registered) while some of the files it points to
never reached Google. The Metaflow client then calls the run unsuccessful (or fails reading an
artifact) while the UI, which trusts `attempt_ok`, shows it "Completed" with no artifacts or logs.

So the first start after a restore checks the tasks that finished in the last `WINDOW_S` seconds
of the restored data (older files had that long to be uploaded before the runtime died) against
the object store: every artifact's object, the attempt's DONE marker, its artifact index
(`data.json`) and its log, none of them empty unless the store recorded it as written empty (Drive
can deliver a file's name without its content), and every artifact of the index registered in the
database (Metaflow records `attempt_ok` before it registers the artifacts, one row at a time). A
task with anything missing is marked lost, and so is its run:

- its `attempt_ok` becomes False: the UI shows the task, and the run through its `end` task, as
  failed;
- its `_task_ok` and `_success` artifacts, and every artifact whose object is missing, are
  unregistered: the client says the task (and the run) did not finish and did not succeed, and
  never points at an object that is not there;
- a metadata field `mfstack-data-lost` says what was missing, in the UI and in `task.metadata_dict`.

Artifacts whose objects did arrive stay readable. Tasks of runs made with the local datastore are
not checked (their files are on the machine that ran them).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .objectstore import holds_object

WINDOW_S = 600.0
LOST_FIELD = "mfstack-data-lost"
_COMPLETION_ARTIFACTS = ("_task_ok", "_success")
_PARALLEL_CHECKS = 16  # each check is a round trip on Google Drive


@dataclass
class ReconcileReport:
    checked: int = 0                                     # finished tasks checked against the store
    lost_tasks: list[str] = field(default_factory=list)  # pathspecs Flow/run/step/task marked lost
    lost_runs: list[str] = field(default_factory=list)   # pathspecs Flow/run whose data is incomplete

    def summary(self) -> str | None:
        if not self.lost_tasks:
            return None
        return (f"{len(self.lost_runs)} run(s) finished in the last seconds before the runtime died lost "
                f"data that had not reached the snapshot folder, now shown as failed: "
                + ", ".join(self.lost_runs[:5]) + (" ..." if len(self.lost_runs) > 5 else ""))


@dataclass(frozen=True)
class _Attempt:
    flow: str
    run_number: int
    run_id: str | None
    step: str
    task_id: int
    task_name: str | None
    attempt: int
    ok_row: int            # id of its attempt_ok row in metadata_v3
    user: str | None
    tags: str              # its tags, as JSON (attempt_id:N)

    @property
    def run_part(self) -> str:
        return self.run_id or str(self.run_number)

    @property
    def task_part(self) -> str:
        return self.task_name or str(self.task_id)

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_part}/{self.step}/{self.task_part}"

    @property
    def keys(self) -> tuple[str, int, str, int]:
        return self.flow, self.run_number, self.step, self.task_id


def reconcile_restored(dsn: str, objects_dir: Path, *, window_s: float = WINDOW_S) -> ReconcileReport:
    """Mark the recently finished tasks whose files are not all in the object store as lost (see
    the module's docstring). Runs once, at the first start after a restore, before any service."""
    report = ReconcileReport()
    with psycopg.connect(dsn, autocommit=False, connect_timeout=10) as conn:
        if not _has_metaflow_tables(conn):
            return report
        attempts = _recently_finished(conn, window_s)
        checks = {attempt: _files_of(conn, attempt, objects_dir) for attempt in attempts}
        checks = {attempt: files for attempt, files in checks.items() if files is not None}
        report.checked = len(checks)
        missing = _missing_files(checks)
        lost = {attempt: reasons for attempt, reasons in missing.items() if reasons}
        runs = sorted({(a.flow, a.run_number, a.run_part) for a in lost})
        for attempt, reasons in lost.items():
            _mark_lost(conn, attempt, reasons)
        for flow, run_number, run_part in runs:
            end = _finished_end_attempt(conn, flow, run_number)
            if end is not None and end not in lost:
                _mark_lost(conn, end, [f"other tasks of run {flow}/{run_part} lost data"])
        conn.commit()
    report.lost_tasks = sorted(a.pathspec for a in lost)
    report.lost_runs = [f"{flow}/{run_part}" for flow, _, run_part in runs]
    return report


def _has_metaflow_tables(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('metadata_v3') IS NOT NULL AND to_regclass('artifact_v3') IS NOT NULL"
                       ).fetchone()
    return bool(row and row[0])


_ATTEMPT_COLUMNS = "flow_id, run_number, run_id, step_name, task_id, task_name, tags, id, user_name"


def _attempt_from(row: tuple[Any, ...]) -> _Attempt:
    flow, run_number, run_id, step, task_id, task_name, tags, row_id, user = row
    return _Attempt(flow, run_number, run_id, step, task_id, task_name, _attempt_number(tags), row_id, user,
                    json.dumps(tags))


def _recently_finished(conn: psycopg.Connection[Any], window_s: float) -> list[_Attempt]:
    rows = conn.execute(
        f"SELECT {_ATTEMPT_COLUMNS} FROM metadata_v3"
        " WHERE field_name = 'attempt_ok' AND value = 'True'"
        " AND ts_epoch >= (SELECT max(ts_epoch) FROM metadata_v3) - %s", (int(window_s * 1000),)).fetchall()
    return [_attempt_from(row) for row in rows]


def _finished_end_attempt(conn: psycopg.Connection[Any], flow: str, run_number: int) -> _Attempt | None:
    row = conn.execute(
        f"SELECT {_ATTEMPT_COLUMNS} FROM metadata_v3 WHERE flow_id = %s AND run_number = %s AND step_name = 'end'"
        " AND field_name = 'attempt_ok' AND value = 'True' ORDER BY ts_epoch DESC LIMIT 1",
        (flow, run_number)).fetchone()
    return None if row is None else _attempt_from(row)


def _attempt_number(tags: Any) -> int:
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, str) and tag.startswith("attempt_id:") and tag[11:].isdigit():
            return int(tag[11:])
    return 0


def _object_path(objects_dir: Path, url: str) -> Path | None:
    """Where the object store keeps s3://bucket/key, or None for anything it does not hold."""
    if not url.startswith("s3://"):
        return None
    bucket, _, key = url[5:].partition("/")
    if not bucket or not key or not (objects_dir / bucket).is_dir():
        return None
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return objects_dir / bucket / Path(*parts)


@dataclass(frozen=True)
class _Needed:
    what: str
    paths: tuple[Path, ...]   # any one of them, present


@dataclass(frozen=True)
class _TaskFiles:
    needed: list[_Needed]
    index: Path                  # the attempt's data.json: every artifact the task stored
    registered: frozenset[str]   # the artifacts the database knows for the attempt


def _files_of(conn: psycopg.Connection[Any], attempt: _Attempt, objects_dir: Path) -> _TaskFiles | None:
    """What a finished attempt needs in the object store, or None when its files are not kept there."""
    flow, run_number, step, task_id = attempt.keys
    row = conn.execute(
        "SELECT value FROM metadata_v3 WHERE flow_id = %s AND run_number = %s AND step_name = %s AND task_id = %s"
        " AND field_name = 'ds-root' AND tags @> %s::jsonb ORDER BY ts_epoch DESC LIMIT 1",
        (flow, run_number, step, task_id, json.dumps([f"attempt_id:{attempt.attempt}"]))).fetchone()
    if row is None:
        return None
    task_dir = _object_path(objects_dir, f"{row[0].rstrip('/')}/{flow}/{attempt.run_part}/{step}/{attempt.task_part}")
    if task_dir is None:
        return None
    prefix = f"{attempt.attempt}."
    index = task_dir / f"{prefix}data.json"
    needed = [
        _Needed("its DONE marker", (task_dir / f"{prefix}DONE.lock",)),
        _Needed("its artifact index", (index,)),
        _Needed("its log", (task_dir / f"{prefix}runtime_stdout.log", task_dir / f"{prefix}task_stdout.log")),
    ]
    registered = set()
    for name, location, sha in conn.execute(
            "SELECT name, location, sha FROM artifact_v3 WHERE flow_id = %s AND run_number = %s"
            " AND step_name = %s AND task_id = %s AND attempt_id = %s ORDER BY name",
            (flow, run_number, step, task_id, attempt.attempt)).fetchall():
        if location.startswith(":root:"):  # content-addressed under the datastore root
            url = f"{location[6:].rstrip('/')}/{flow}/data/{(sha or '')[:2]}/{sha}"
        else:
            url = location
        registered.add(name)
        path = _object_path(objects_dir, url)
        if path is not None:
            needed.append(_Needed(f"artifact {name}", (path,)))
    return _TaskFiles(needed, index, frozenset(registered))


def _present(needed: _Needed) -> bool:
    return any(holds_object(path) for path in needed.paths)


def _unregistered(files: _TaskFiles) -> list[str]:
    """The artifacts the attempt's index lists that the database does not know."""
    try:
        stored = json.loads(files.index.read_bytes())["objects"]
        names = set(stored) if isinstance(stored, dict) else set()
    except (OSError, ValueError, KeyError, TypeError):
        return []  # an index that is missing or torn is reported as missing
    return [f"the registration of artifact {name}" for name in sorted(names - files.registered)]


def _missing_files(checks: dict[_Attempt, _TaskFiles]) -> dict[_Attempt, list[str]]:
    """What each attempt lacks; every file is looked at once, many at a time (Drive is slow per file)."""
    unique = {needed for files in checks.values() for needed in files.needed}
    with ThreadPoolExecutor(max_workers=_PARALLEL_CHECKS) as pool:
        present = dict(zip(unique, pool.map(_present, unique)))
        unregistered = dict(zip(checks, pool.map(_unregistered, checks.values())))
    return {attempt: [needed.what for needed in files.needed if not present[needed]] + unregistered[attempt]
            for attempt, files in checks.items()}


def _mark_lost(conn: psycopg.Connection[Any], attempt: _Attempt, reasons: list[str]) -> None:
    flow, run_number, step, task_id = attempt.keys
    missing_artifacts = [reason.removeprefix("artifact ") for reason in reasons if reason.startswith("artifact ")]
    conn.execute("UPDATE metadata_v3 SET value = 'False' WHERE id = %s AND field_name = 'attempt_ok'",
                 (attempt.ok_row,))
    conn.execute(
        "DELETE FROM artifact_v3 WHERE flow_id = %s AND run_number = %s AND step_name = %s AND task_id = %s"
        " AND attempt_id = %s AND name = ANY(%s)",
        (flow, run_number, step, task_id, attempt.attempt, [*_COMPLETION_ARTIFACTS, *missing_artifacts]))
    text = ("not uploaded to the snapshot folder before the runtime died: " + "; ".join(reasons))[:1000]
    conn.execute(
        "INSERT INTO metadata_v3 (flow_id, run_number, run_id, step_name, task_id, task_name, field_name, value,"
        " type, user_name, ts_epoch, tags, system_tags) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (flow, run_number, attempt.run_id, step, task_id, attempt.task_name, LOST_FIELD, text, LOST_FIELD,
         attempt.user, int(time.time() * 1000), attempt.tags, None))
